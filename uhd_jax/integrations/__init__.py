"""Our models inside other projects' evaluation harnesses (lmms-eval: `lmms_model`)."""


def lmms_manifest():
    """lmms-eval's registration record for `--model uhd_jax`, read through the `lmms_eval.models` entry point group
    (setup.py) that lmms-eval 0.7 loads when it builds its model registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="uhd_jax", simple_class_path="uhd_jax.integrations.lmms_model.UHDJax")
