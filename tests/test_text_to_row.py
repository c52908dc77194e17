"""The map from label-text embeddings to rows (labels/text_to_row.py) against a dense least-squares reference, and
the ids it is fitted on."""

import pytest
import torch

from astra_ds.labels.text_to_row import FIT_LABELS, fit_ranges, fit_text_to_row


def test_the_map_is_the_ridge_least_squares_solution():
    generator = torch.Generator().manual_seed(0)
    texts = torch.randn(40, 12, generator=generator, dtype=torch.float64)
    rows = torch.randn(40, 7, generator=generator, dtype=torch.float64)
    ridge = 0.7
    reference = torch.linalg.lstsq(torch.cat([texts, ridge ** 0.5 * torch.eye(12, dtype=torch.float64)]),
                                   torch.cat([rows, torch.zeros(12, 7, dtype=torch.float64)])).solution
    torch.testing.assert_close(fit_text_to_row(texts.float(), rows.float(), ridge), reference, rtol=1e-5, atol=1e-6)


def test_a_linear_relation_is_recovered_when_there_are_more_labels_than_dimensions():
    generator = torch.Generator().manual_seed(1)
    texts = torch.randn(500, 10, generator=generator, dtype=torch.float64)
    true_map = torch.randn(10, 6, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(fit_text_to_row(texts, texts @ true_map, ridge=1e-9), true_map)


@pytest.mark.parametrize("num_labels", [1, FIT_LABELS, FIT_LABELS + 1, 123_456_789])
def test_the_fit_reads_at_most_fit_labels_ids_spread_over_the_table(num_labels):
    ranges = fit_ranges(num_labels)
    ids = [i for r in ranges for i in r]
    assert len(ids) == min(num_labels, FIT_LABELS)
    assert ids == sorted(set(ids)) and ids[0] == 0 and ids[-1] == num_labels - 1
