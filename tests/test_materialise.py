"""Computing output tensors in order: what the caller holds is all that stays alive."""

from __future__ import annotations

import gc
import weakref

import pytest

import wtool.materialise
from wtool import Pipeline, open_checkpoint
from wtool.materialise import materialise_in_order
from wtool.pipeline import plan


@pytest.mark.parametrize("specs", [["clip:c=0.01"], ["clip:c=0.01", "quantize:bits=4"]])
def test_a_written_tensor_is_freed_before_the_next_is_computed(llama, monkeypatch, specs):
    """One job holds one output tensor: once the caller drops a tensor it has written, nothing
    in the loop may keep it alive while the next one is computed."""
    written: list[weakref.ref] = []
    held_while_computing: list[int] = []
    real = wtool.materialise.materialise

    def watched(*args, **kwargs):
        gc.collect()
        held_while_computing.append(sum(ref() is not None for ref in written))
        return real(*args, **kwargs)

    monkeypatch.setattr(wtool.materialise, "materialise", watched)
    reader = open_checkpoint(llama)
    try:
        the_plan = plan(Pipeline.from_specs(specs), reader)
        for _node, array in materialise_in_order(reader, the_plan.chains, 1, True, lambda record: None):
            written.append(weakref.ref(array))
            del array
    finally:
        reader.close()
    assert len(held_while_computing) == len(the_plan.chains) > 1
    assert held_while_computing == [0] * len(held_while_computing)
