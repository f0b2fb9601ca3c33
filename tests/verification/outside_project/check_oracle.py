"""An outside project's test: only the plugin's documented API (proma_case, proma_check)."""
import pytest

import tinyproma


def test_tinyproma_matches_the_oracle(proma_case, proma_check):
    if not tinyproma.supports(proma_case.settings):
        pytest.skip("setting not implemented by tinyproma")
    proma_check(proma_case, tinyproma.accumulate(proma_case), allow_missing=True)


def test_a_wrong_sign_is_caught(proma_case, proma_check):
    if not tinyproma.supports(proma_case.settings) or not any(l.uses == ("linear",) for l in proma_case.layers):
        pytest.skip("nothing to check")
    with pytest.raises(AssertionError, match="PROMA oracle check failed"):
        proma_check(proma_case, tinyproma.accumulate(proma_case, sign=-1.0), allow_missing=True)
