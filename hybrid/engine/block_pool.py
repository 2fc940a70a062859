"""The blocks of a paged KV cache as the engine sees them: reference counts, a prefix tree of
full blocks, eviction of unreferenced ones.

A block holds B consecutive tokens' KV of one sequence. Its KV depends only on the tokens up to
its end, so a block is named by the path of token tuples from the start of the sequence: the
prefix tree (a radix tree with one block per edge) maps that path to the block. Two sequences
whose first k*B tokens agree walk the same k nodes and share those k blocks.

  - ref[b]: how many live sequences use block b. A block with ref 0 that is in the tree is
    *cached*: nobody uses it, but a later prompt with that prefix may (an LRU list of them);
    a block with ref 0 outside the tree is *free*.
  - A node may be in the tree before its KV is: the sequence that will compute it (its writer)
    inserts its prompt's full blocks when admitted, so a sequence admitted a moment later with
    the same prefix shares them and waits for the writer instead of computing them again.
  - The tail of a finished sequence (a last block that is not full) is kept as a leaf too; a
    later prompt that starts with part of it, or with part of any block, copies that block
    (copy-on-write) instead of recomputing those tokens: shared blocks are never written.
  - Allocation takes a free block, else evicts the least recently used cached leaf (a cached
    node's descendants are all cached too, so leaves go first and the tree stays a tree).
  - reserve(n) promises n blocks to an admitted sequence, so it can grow to its limit without
    preempting anyone: available() is what admission may still promise.

Not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(eq=False)
class Node:
    block: int | None  # None for the root
    tokens: tuple[int, ...]  # this block's tokens: B of them, or fewer for a finished tail
    parent: "Node | None" = None
    children: dict = field(default_factory=dict)  # tokens tuple -> Node
    writer: int | None = None  # id of the sequence computing its KV; None once written


@dataclass
class Match:
    nodes: list[Node]  # full blocks shared, in order from the start
    shared_tokens: int = 0  # len(nodes) x B
    copy_from: Node | None = None  # the block whose first `copy_tokens` tokens are copied
    copy_tokens: int = 0

    @property
    def tokens(self) -> int:
        """Tokens whose KV the match provides."""
        return self.shared_tokens + self.copy_tokens


class BlockPool:
    """N blocks of B tokens."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockPool: need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))  # pop() takes the lowest id first
        self.root = Node(None, ())
        self.node_of: dict[int, Node] = {}  # block -> its node, for blocks in the tree
        self.cached: OrderedDict[int, None] = OrderedDict()  # ref-0 blocks in the tree, oldest first
        self.reserved = 0  # blocks promised to admitted sequences, not yet allocated
        self.evictions = 0

    # ---- what admission may promise ----------------------------------------------------------
    def available(self) -> int:
        return len(self.free) + len(self.cached) - self.reserved

    def reserve(self, n: int) -> None:
        if n > self.available():
            raise RuntimeError(f"BlockPool.reserve: {n} blocks asked, {self.available()} available")
        self.reserved += n

    def unreserve(self, n: int) -> None:
        if not 0 <= n <= self.reserved:
            raise RuntimeError(f"BlockPool.unreserve: {n} of {self.reserved} reserved")
        self.reserved -= n

    # ---- blocks ------------------------------------------------------------------------------
    def allocate(self) -> int:
        """One block out of the reservation, ref 1: a free one, else the oldest cached leaf."""
        if self.reserved < 1:
            raise RuntimeError("BlockPool.allocate: nothing reserved")
        if self.free:
            block = self.free.pop()
        else:
            block = self._evict_one()
        self.reserved -= 1
        self.ref[block] = 1
        return block

    def _evict_one(self) -> int:
        for block in self.cached:
            node = self.node_of[block]
            if not node.children:
                self._remove(node)
                self.evictions += 1
                return block
        raise RuntimeError("BlockPool: no block to evict (the reservation accounting is broken)")

    def _remove(self, node: Node) -> None:
        """Take a childless node out of the tree (its block is then neither cached nor free)."""
        del node.parent.children[node.tokens]
        del self.node_of[node.block]
        self.cached.pop(node.block, None)

    def acquire(self, block: int) -> None:
        """One more user of a block already in use or cached."""
        if self.ref[block] == 0:
            if block not in self.cached:
                raise RuntimeError(f"BlockPool.acquire: block {block} is free")
            del self.cached[block]
        self.ref[block] += 1

    def release(self, block: int) -> None:
        """One user fewer; at 0 the block is cached (in the tree, newest) or free."""
        if self.ref[block] < 1:
            raise RuntimeError(f"BlockPool.release: block {block} is not in use")
        self.ref[block] -= 1
        if self.ref[block] == 0:
            if block in self.node_of:
                self.cached[block] = None
            else:
                self.free.append(block)

    # ---- the prefix tree ---------------------------------------------------------------------
    def match(self, tokens: list[int], limit: int) -> Match:
        """The longest prefix of tokens[:limit] the tree holds: whole blocks to share, then at
        most one block part to copy (only from a block whose KV is written)."""
        B, node, nodes = self.block_size, self.root, []
        i = 0
        while i + B <= limit:
            child = node.children.get(tuple(tokens[i:i + B]))
            if child is None:
                break
            nodes.append(child)
            node, i = child, i + B
        best, best_n = None, 0
        want = tokens[i:min(limit, i + B)]
        if want:
            for key, child in node.children.items():
                if child.writer is not None:
                    continue
                n = common_prefix(key, want)
                if n > best_n:
                    best, best_n = child, n
        return Match(nodes, len(nodes) * B, best, best_n)

    def insert(self, parent: Node, tokens: tuple[int, ...], block: int, writer: int | None) -> Node | None:
        """Put block (in use by its caller) into the tree under parent; None when that path is
        already there (the caller keeps its block private)."""
        if tokens in parent.children or block in self.node_of:
            return None
        node = Node(block, tokens, parent, writer=writer)
        parent.children[tokens] = node
        self.node_of[block] = node
        return node

    def drop(self, node: Node) -> None:
        """Remove an in-use node whose KV will never be written (its writer failed) and every
        node below it; their blocks stay with their users and are freed when released."""
        for child in list(node.children.values()):
            self.drop(child)
        del node.parent.children[node.tokens]
        del self.node_of[node.block]
        if node.block in self.cached:  # ref 0: nobody holds it, so it is free now
            del self.cached[node.block]
            self.free.append(node.block)

    # ---- counts for /metrics ----------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        used = sum(1 for r in self.ref if r > 0)
        return {"kv_blocks_total": self.num_blocks, "kv_blocks_used": used,
                "kv_blocks_shared": sum(1 for r in self.ref if r > 1),
                "kv_blocks_cached": len(self.cached), "kv_blocks_free": len(self.free),
                "kv_blocks_reserved": self.reserved, "kv_block_size": self.block_size}


def common_prefix(a, b) -> int:
    """How many leading elements a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
