"""runtime.parallel.ordered_map: results in input order for any number of workers, worker
errors raised in the caller."""
import pytest

from runtime.parallel import ordered_map


def _square_unless_seven(x: int) -> int:
    if x == 7:
        raise ValueError("seven is refused")
    return x * x


def test_same_results_in_input_order_for_any_workers():
    items = list(range(7))
    inline = list(ordered_map(_square_unless_seven, items, workers=1, show=False))
    pooled = list(ordered_map(_square_unless_seven, items, workers=2, show=False))
    assert inline == pooled == [x * x for x in items]


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_error_reaches_the_caller(workers):
    with pytest.raises(ValueError, match="seven is refused"):
        list(ordered_map(_square_unless_seven, range(12), workers=workers, show=False))
