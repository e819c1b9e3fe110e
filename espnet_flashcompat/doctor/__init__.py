"""``espnet-flashcompat doctor``: what state the S3PRL stack of an environment is in, and what to do about it.

- ``findings``: a finding's levels and the exit code they give (0 healthy, 1 degraded, 2 broken).
- ``report``: ``gather()`` asks the other concerns and writes down their answers (the JSON report).
- ``attention``: what the attention policies decide on each device, and the YAML to recommend.
- ``text``: the report as a human-readable table.

In 0.1 ``gather`` lived in the module ``espnet_flashcompat.doctor``; its names still resolve here.
"""


def __getattr__(name):
    from espnet_flashcompat import _moved

    return _moved.forward(__name__, name)
