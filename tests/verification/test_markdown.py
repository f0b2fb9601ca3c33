"""The report's p-value format: the side of the test level stays readable."""
import pytest

from verification.report.markdown import p_value


@pytest.mark.parametrize("p, text", [
    (0.0502, "0.0502"),      # rounds onto 0.05 at 2 digits: one more digit shows it is above
    (0.0499, "0.0499"),      # and below
    (0.05, "0.05"),          # exactly the level
    (0.051, "0.051"),        # 2 digits already clear of the level
    (0.11, "0.11"),
    (3e-5, "3.0e-05"),       # scientific below 1e-4
])
def test_p_value_keeps_the_side_of_the_test_level(p, text):
    assert p_value(p) == text
