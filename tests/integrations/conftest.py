"""Fixtures shared by the TRL integration tests: the tiny tokenizer and Qwen3 policy of
:mod:`verification.trl_testkit`, built once per test module (tests copy the policy before training it)."""
import pytest

from verification.trl_testkit import tiny_policy, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def policy(tokenizer):
    return tiny_policy(tokenizer)
