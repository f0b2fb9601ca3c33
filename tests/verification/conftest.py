"""Fixtures shared by the verification tests: one synthetic case directory per session, a private cache."""
import pytest

from verification.oracle.cases import generator_info, synthetic_cases
from verification.oracle.format import save_cases


@pytest.fixture(scope="session")
def cases_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cases")
    save_cases(path, synthetic_cases(0), generator=generator_info(0))
    return path


@pytest.fixture(scope="session")
def realcase_cache(tmp_path_factory):
    """Warm-start cache of the real-case policy, shared by the real-case and report tests."""
    return tmp_path_factory.mktemp("realcase-cache")


@pytest.fixture(scope="session", autouse=True)
def private_proma_cache(tmp_path_factory):
    """Generated case sets and warm-starts go to a temporary cache, never the user's ~/.cache/proma."""
    from verification.oracle.golden import CACHE_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("proma-cache")))
        yield
