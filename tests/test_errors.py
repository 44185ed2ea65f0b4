"""Errors cross process boundaries whole: a pool worker's daman error reaches the parent as
the same class with the same message (``multiprocessing`` pickles it)."""

from __future__ import annotations

import inspect
import pickle

import pytest

import daman.errors as errors

SAMPLES: dict[type, tuple[object, ...]] = {
    errors.InvalidKeyError: ("a//b", "a key cannot contain empty parts"),
    errors.KeyNotFoundError: ("team/x", "the local cache"),
    errors.KeyExistsError: ("team/x",),
    errors.VersionNotFoundError: ("team/x", "20261130T000000.000Z-1a2b3c4d", "the store"),
}
CLASSES = [
    cls
    for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, errors.DamanError)
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_pickles_whole(cls: type) -> None:
    error = cls(*SAMPLES.get(cls, ("something went wrong. Do this next.",)))
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is cls
    assert str(again) == str(error)
    assert vars(again) == vars(error)
