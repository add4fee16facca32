import pytest

from fastmode.engine.block_manager import BlockManager


def test_allocate_covers_tokens_and_release_returns_blocks():
    bm = BlockManager(num_blocks=10, block_size=16)
    blocks = bm.allocate(33)  # 33 tokens need 3 blocks of 16
    assert len(blocks) == 3 and len(set(blocks)) == 3
    assert bm.num_free == 7
    bm.release(blocks)
    assert bm.num_free == 10 and blocks == []


def test_cannot_allocate_more_than_free():
    bm = BlockManager(num_blocks=2, block_size=16)
    assert bm.can_allocate(32) and not bm.can_allocate(33)
    with pytest.raises(MemoryError):
        bm.allocate(33)
    assert bm.num_free == 2


def test_slot_maps_position_through_block_table():
    bm = BlockManager(num_blocks=8, block_size=4)
    blocks = [5, 2, 7]
    assert [bm.slot(blocks, p) for p in (0, 3, 4, 9)] == [20, 23, 8, 29]
