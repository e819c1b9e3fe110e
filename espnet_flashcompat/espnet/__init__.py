"""Hooking into ESPnet: how ``frontend: s3prl_flashcompat`` and ``model_attn_implementation`` reach a run.

- ``registry``: adds the frontend to every task's ``frontend_choices`` (``register()``) and the ``.pth`` startup hook
  that does it lazily when a task module is imported, in every interpreter (DDP workers too).
- ``espnet_compat``: the one place where ESPnet releases differ (task modules, attention classes, S3PRL distribution).
- ``request``: how the user asks for the model-wide attention policy (environment, YAML, strictness).
- ``optin``: wraps the task classes so that ``build_model`` applies that policy when asked.
- ``model_attention``: the model-wide policy on ESPnet's own attention modules.

Import-light where the startup hook reads it: ``registry`` and ``espnet_compat`` import neither torch nor ESPnet.
"""
