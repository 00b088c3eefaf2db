"""``TrainingArguments(torch_compile=True, torch_compile_backend="chronicals")``.

Hugging Face's ``Trainer`` (and TRL's trainers, its subclasses) hands the backend name to
accelerate as ``TorchDynamoPlugin(backend=...)`` (or, before accelerate 1.2, the environment
variable ``ACCELERATE_DYNAMO_BACKEND``), whose ``__post_init__`` converts it with
``DynamoBackend(name.upper())``: an ``Enum`` of accelerate's own backend names, so any other
name raised ``ValueError: 'CHRONICALS' is not a valid DynamoBackend`` before training started.
Past that check accelerate only compares the value to ``NO`` and, at ``prepare``, calls
``torch.compile(model, backend=value.lower(), ...)``, which finds ``"chronicals"`` through
torch's ``torch_dynamo_backends`` entry point.

So the fix is one more member, ``DynamoBackend.CHRONICALS``, added to accelerate's enum when
chronicals is imported (``import chronicals`` or ``chronicals run``): lookups by value and by
name, ``in``, iteration and ``DynamoBackend.list()`` all see it, and no accelerate or
transformers code is replaced. ``accelerate launch --dynamo_backend chronicals`` works too when
the launched script imports chronicals (the launcher itself checks the name before the script
runs: there, set the backend in the script's ``TrainingArguments`` instead).
"""

from __future__ import annotations

import logging

log = logging.getLogger("chronicals")

NAME = "CHRONICALS"


def register_with_accelerate() -> bool:
    """Make ``"chronicals"`` a valid accelerate ``DynamoBackend``; True when it is.

    Idempotent; a missing or unexpected accelerate is left alone (False).
    """
    try:
        from accelerate.utils.dataclasses import DynamoBackend
    except Exception:  # accelerate absent or broken: nothing to register with
        return False
    if NAME in DynamoBackend._value2member_map_:
        return True
    try:
        add_member = getattr(DynamoBackend, "_add_member_", None)  # Python 3.13+
        member = str.__new__(DynamoBackend, NAME)
        member._name_ = member._value_ = NAME
        member.__objclass__ = DynamoBackend
        member._sort_order_ = len(DynamoBackend._member_names_)
        if add_member is not None:  # sets the class attribute and _member_map_
            add_member(NAME, member)
        else:
            type.__setattr__(DynamoBackend, NAME, member)
            DynamoBackend._member_map_[NAME] = member
        DynamoBackend._member_names_.append(NAME)
        DynamoBackend._value2member_map_[NAME] = member
        assert DynamoBackend(NAME) is member and DynamoBackend[NAME] is member
    except Exception as e:  # a future enum layout: say so, change nothing else
        log.warning("chronicals: could not add %s to accelerate's DynamoBackend (%s); "
                    "use chronicals.optimize(model) or `chronicals run` instead", NAME, e)
        return False
    return True
