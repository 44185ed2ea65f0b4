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


@pytest.mark.parametrize(
    ("text", "first"),
    [
        (
            "cannot reach s3://b/ (Could not connect to the endpoint URL: "
            '"http://127.0.0.1:1/b". Retry). Check the network and the endpoint; a cached copy '
            "is still used by pull when there is one.",
            'cannot reach s3://b/ (Could not connect to the endpoint URL: "http://127.0.0.1:1/b". '
            "Retry)",
        ),
        ("one sentence only", "one sentence only"),
        ("the folder a.b is gone. Mount it.", "the folder a.b is gone"),
    ],
)
def test_a_warning_keeps_an_errors_first_sentence(text: str, first: str) -> None:
    assert errors.first_sentence(errors.StoreUnavailableError(text)) == first


@pytest.mark.parametrize(
    ("word", "phrase"),
    [("ndarray", "an ndarray"), ("list", "a list"), ("int", "an int"), ("", "a ")],
)
def test_the_article_fits_the_word(word: str, phrase: str) -> None:
    assert errors.a(word) == phrase
