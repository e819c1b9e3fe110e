"""Hooking into ESPnet: how ``frontend: s3prl_flashcompat`` and ``model_attn_implementation`` reach a run.

- ``registry``: adds the frontend to every task's ``frontend_choices`` (``register()``) and the ``.pth`` startup hook
  that does it lazily when a task module is imported, in every interpreter (DDP workers too).
- ``espnet_compat``: the one place where ESPnet releases differ (task modules, attention classes, S3PRL distribution).
- ``request``: how the user asks for the model-wide attention policy (environment, YAML, strictness).
- ``optin``: wraps the task classes so that ``build_model`` applies that policy when asked.
- ``model_policy``: the model-wide policy's decisions, per attention site (the rule; ``auto`` measured on CUDA).
- ``model_attention``: puts ESPnet's own attention modules under that policy; they run what it decides.
- ``model_calibration``: what one calibration of an attention site times, and on what (its real calls).
- ``espnet_fallback``: ESPnet's own flash-attn fallback, caught with its real exception.

Import-light where the startup hook reads it: ``registry`` and ``espnet_compat`` import neither torch nor ESPnet.
"""
