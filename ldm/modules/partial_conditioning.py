"""Conditioning that only some rows of a batch have.

Classifier-free guidance evaluates the unconditional and conditional halves as one batch, so their
conditioning entries are stacked. When an entry exists on one side only (ControlNet's guess mode
leaves the unconditional half without control: ``c_concat`` None there, a hint on the other side),
the stacked entry is a ``PartialConditioning``: the present side's value, and the rows it belongs to.
A model that reads the entry applies it to those rows and leaves the others as if it were absent.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class PartialConditioning:
    value: object    # the entry as that side has it: a tensor, a list, a conditioning object
    rows: slice      # the rows of the stacked batch it conditions


def fill_rows(values, rows, batch):
    """``values`` [n, ...] (the rows ``rows`` of a batch of ``batch``) as [batch, ...], zero elsewhere."""
    if rows is None:
        return values
    full = values.new_zeros((batch, *values.shape[1:]))
    full[rows] = values
    return full
