"""Serve a checkpoint behind the OpenAI chat-completions API, with in-flight batching and a web page.

  uhd-serve --checkpoint runs/uhd_v2-7b/sft/final --port 8000 [--slots 8] [--mesh 1,1,8]

  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"messages": [{"role": "user",
    "content": [{"type": "text", "text": "What is written?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}], "stream": true}'

Endpoints: POST /v1/chat/completions (max_tokens, temperature, top_p, stop, seed, stream, n=1), GET /v1/models,
GET /health, POST /v1/slice_plan {"image_url": ...} (how the model slices an image), GET / (the page in
uhd_jax/serve/web/). Concurrent requests are decoded together in --slots rows of one KV cache of
--max-prompt-tokens + --max-tokens-limit positions; a request over a limit gets a 4xx OpenAI error object.
"""
from __future__ import annotations

import argparse
import sys

from absl import flags, logging

flags.FLAGS.mark_as_parsed()
logging.set_verbosity(logging.WARNING)

from uhd_jax.cli_errors import UserError, reports_user_errors  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a parameter checkpoint directory (a stage's final/, or a "
                                                       "converted one): it names its model and tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (rows of the KV cache)")
    p.add_argument("--mesh", default=None, help="shard parameters and cache over this process's devices: "
                                                "data,fsdp,tensor sizes, e.g. 1,1,8")
    p.add_argument("--dtype", default=None, help="compute dtype (bfloat16, float32); default: the checkpoint's")
    p.add_argument("--model-id", default=None, help="the model's name in the API (default: the checkpoint's)")
    p.add_argument("--allow-local-images", action="store_true",
                   help="accept image_url paths on this machine (file:///x.png); refused by default")
    p.add_argument("--max-image-bytes", type=int, default=20 * 2 ** 20)
    p.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="checked from the image header before any pixel is decoded")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt, text and image tokens (default: the model's positions less "
                        "--max-tokens-limit)")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="the most new tokens a request may ask for (default: the family's rule)")
    p.add_argument("--log", action="store_true", help="print one line per request")
    return p


@reports_user_errors
def main(argv=None) -> int:
    a = parser().parse_args(argv)
    for name in ("slots", "max_image_bytes", "max_image_pixels"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if not 0 <= a.port < 65536:
        raise UserError(f"--port must be in 0..65535, got {a.port}")
    import uhd_jax
    from uhd_jax.serve.engine import Engine
    from uhd_jax.serve.openai_schema import Limits
    from uhd_jax.serve.server import Server

    model = uhd_jax.load(a.checkpoint, dtype=a.dtype, batch_size=1, **({"mesh": a.mesh} if a.mesh else {}))
    engine = Engine(model, a.slots, max_tokens_limit=a.max_tokens_limit, max_prompt_tokens=a.max_prompt_tokens)
    limits = Limits(a.max_image_bytes, a.max_image_pixels, a.allow_local_images)
    try:
        server = Server((a.host, a.port), engine, model_id=a.model_id or model.loaded.model_id, limits=limits,
                        log=a.log)
    except OSError as e:
        engine.close()
        raise UserError(f"cannot listen on {a.host}:{a.port}: {e.strerror or e}") from None
    print(f"uhd-serve: {server.model_id} on {server.url} ({a.slots} slots, prompts up to "
          f"{engine.max_prompt_tokens} tokens, answers up to {engine.max_tokens_limit})", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
