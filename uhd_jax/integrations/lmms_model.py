"""`lmms-eval --model uhd_jax --model_args checkpoint=runs/NAME/sft/final[,benchmark=textvqa,batch_size=8,...]`.

A "simple" lmms-eval model (lmms_eval.api.model.lmms, as read from lmms-eval 0.7.3's source): requests carry
(context, generation kwargs | continuation, doc_to_visual, doc_id, task, split); the images come from
`doc_to_visual(self.task_dict[task][split][doc_id])`. Answers and log-likelihoods come from
`integrations.harness.HarnessModel` (our batched generator, static shapes and length buckets). model_args:
checkpoint (required), config, benchmark (whose prompt rule and slicing apply; default 'open', as `uhd-generate
--prompt`), batch_size, dtype, tokenizer, data_root, seed.
"""
from __future__ import annotations

from lmms_eval.api import instance as lmms_instance
from lmms_eval.api.model import lmms

from uhd_jax.cli_errors import UserError
from uhd_jax.integrations.harness import HarnessModel, settings_from


class UHDJax(lmms):
    is_simple = True

    def __init__(self, checkpoint: str = "", config: str | None = None, benchmark: str = "open",
                 batch_size: int | str = 8, dtype: str | None = None, tokenizer: str | None = None,
                 data_root: str | None = None, seed: int | str = 0, **unknown):
        super().__init__()
        # lmms-eval passes its own batch_size/device settings through additional_config
        for key in ("device", "max_batch_size"):
            unknown.pop(key, None)
        if unknown:
            raise UserError(f"--model_args: unknown argument(s) {sorted(unknown)}; uhd_jax takes checkpoint, config, "
                            f"benchmark, batch_size, dtype, tokenizer, data_root, seed")
        if not checkpoint:
            raise UserError("--model_args checkpoint=DIR: give the checkpoint to evaluate (a stage's final/ folder)")
        if not str(batch_size).isdigit():
            raise UserError(f"batch_size {batch_size!r}: give a number (uhd_jax batches are of a fixed size)")
        self.model = HarnessModel(checkpoint, config=config, benchmark=benchmark, batch_size=int(batch_size),
                                  dtype=dtype, tokenizer=tokenizer, data_root=data_root)
        self.seed = int(seed)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As lmms' own, except that a key given in --model_args wins over lmms-eval's flag of the same name (its
        CLI always sends batch_size, 1 unless --batch_size is given)."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    def _images(self, doc_to_visual, doc_id, task, split):
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        return [v for v in (visuals or []) if v is not None]

    def generate_until(self, requests) -> list[str]:
        items = []
        for r in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = r.args
            items.append((context, self._images(doc_to_visual, doc_id, task, split), settings_from(gen_kwargs)))
        return self.model.generate(items, seed=self.seed)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(mean negative log-likelihood per continuation token, is greedy): the loss lmms-eval's own LLaVA returns,
        which its multiple_choice scoring expects (it takes the argmin over the choices)."""
        items = []
        for r in requests:
            context, target, doc_to_visual, doc_id, task, split = r.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            items.append((context, continuation, self._images(doc_to_visual, doc_id, task, split)))
        pairs = [(-logp / n, greedy) for logp, n, greedy in self.model.loglikelihood(items)]
        # lmms-eval 0.7.3's evaluator passes every response through unwrap_generation_output, which turns a
        # (float, bool) tuple into its str() and breaks multiple_choice scoring; a GenerationResult's payload is
        # handed on as it is
        wrap = getattr(lmms_instance, "GenerationResult", None)
        return [wrap(text=p) for p in pairs] if wrap is not None else pairs

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("uhd_jax answers single-turn requests (generate_until, loglikelihood); "
                                  "multi-round tasks are not supported")
