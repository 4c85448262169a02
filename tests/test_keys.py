"""The async API's key and slot-id checks (kvactors.keys), on the compiled pass
(kvactors._key_checks) and on the Python fallback: the same answers."""

from __future__ import annotations

import pytest

from kvactors import keys
from kvactors.errors import InvalidKeyError


@pytest.mark.parametrize("core", ["native", "python"])
def test_argument_checks_agree_on_both_paths(core: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if core == "python":
        monkeypatch.setattr(keys, "_first_bad_key", None)
        monkeypatch.setattr(keys, "_first_bad_slot", None)
    elif keys._first_bad_key is None:
        pytest.skip("kvactors._key_checks not built")
    for ids, ok in [
        ([0, 1, 3], True),
        ([3], True),
        ([], False),
        ([0, 4], False),  # out of range
        ([-1, 0], False),
        ([1, 1], False),  # named twice
        ([0, True], False),  # not a plain int
        ([0, 1.0], False),
        (["0", "1"], False),  # sortable among themselves, but not slot ids
        ([b"\x00"], False),
        ([1.0, 2.0], False),
        ([0, 2**70], False),
        ((0, 1), False),  # not a list: the caller converts and checks
    ]:
        assert keys.distinct_slots(ids, 4) is ok, ids
    keys.check_keys([1, b"x", 2])
    with pytest.raises(InvalidKeyError, match="'a' has type str"):
        keys.check_keys([1, "a"])  # type: ignore[list-item]
    with pytest.raises(InvalidKeyError, match="b'x' is named twice"):
        keys.check_keys([b"x", 1, b"x"], "store")
    with pytest.raises(InvalidKeyError, match="store: block key"):
        keys.check_keys([[1]], "store")  # type: ignore[list-item]


def test_the_checks_left_the_manager() -> None:
    from kvactors import manager

    assert not hasattr(manager, "distinct_slots")
    assert not hasattr(manager, "check_keys")
