"""Where a sequence's KV lives, for the two kinds of cache (chosen once, by the cache's kind):

  SlotKV   a slot cache (a whole-context grid per sequence, e.g. Qwen3's head cache): a request
           takes a free slot; a freed slot keeps its KV and its tokens, and a new request takes
           the one sharing the longest prompt prefix (the next turn of a chat).
  PagedKV  a paged cache (hybrid/models/paged_kv_cache.py): a request takes a table row (its
           slot) and blocks from the BlockPool (block_pool.py); prompts that start alike share
           full blocks through the prefix tree while they run, not only after one ends.

Prompts are matched by their keys (engine _Request.keys: token ids, and (pixel hash, index)
inside an image), not the bare ids. The engine calls both the same way, under its lock:
admit(req) (False: wait), ready(req) (False: skip this step, its shared prefix is still being
computed by another request), prepare(steps) before a forward (blocks for the positions about to
be written), advance(req) after a successful one, release(req, kv_valid), counts() for stats.

Reused entries are valid: a token's KV depends only on the tokens before it (up to the
rounding differences any batching brings in bf16), and a request only ever writes positions
past what it reuses, into blocks nobody else reads.
"""

from __future__ import annotations

from hybrid.engine.block_pool import common_prefix


class SlotKV:
    def __init__(self, cache, max_seqs: int, prefix_reuse: bool):
        self.cache, self.prefix_reuse, self.max_seqs = cache, prefix_reuse, max_seqs
        self._free = list(range(max_seqs))  # oldest freed first
        self._tokens: dict[int, list[int]] = {}  # free slot -> tokens whose KV it holds

    def blocks_for(self, n_tokens: int) -> int:
        return 1

    def total_blocks(self) -> int:
        return self.max_seqs  # one "block" (a slot) per sequence

    def admit(self, req) -> bool:
        if not self._free:
            return False
        req.slot, req.computed = self._pick(req.keys)
        self._free.remove(req.slot)
        self._tokens.pop(req.slot, None)
        return True

    def _pick(self, prompt: list[int]) -> tuple[int, int]:
        # With no shared prefix: an empty slot, else the one freed longest ago (the recently
        # freed ones are likelier to be continued, e.g. the next turn of a chat).
        empty = [s for s in self._free if s not in self._tokens]
        best_slot, best = (empty or self._free)[0], 0
        if self.prefix_reuse:
            # at least the prompt's last token is fed again: its logits pick the first output
            limit = len(prompt) - 1
            for slot in reversed(self._free):
                n = common_prefix(self._tokens.get(slot, ()), prompt[:limit])
                if n > best:
                    best_slot, best = slot, n
        return best_slot, best

    def ready(self, req) -> bool:
        return True

    def prepare(self, steps) -> None:
        pass

    def advance(self, req) -> None:
        pass

    def release(self, req, kv_valid: bool) -> None:
        """The KV is kept for prefix reuse unless a failed step may have left it half written."""
        keep = self.prefix_reuse and kv_valid
        if not keep:
            self.cache.reset(req.slot)
            self._tokens.pop(req.slot, None)
        else:
            self._tokens[req.slot] = req.computed_keys()
        self._free.append(req.slot)

    def counts(self) -> dict:
        return {}


class _Seq:
    """A request's blocks: blocks[i] holds positions i*B..i*B+B-1; nodes[i] its tree node (None
    for a private block); reserved: blocks still promised to it."""

    def __init__(self):
        self.blocks: list[int] = []
        self.nodes: list = []
        self.reserved = 0
        self.dirty = True  # the cache's table row must be rewritten before the next forward
        self.waits_from = 0  # nodes[:waits_from] are known to be written


class PagedKV:
    def __init__(self, cache, max_seqs: int, prefix_reuse: bool):
        from hybrid.engine.block_pool import BlockPool

        self.cache, self.prefix_reuse = cache, prefix_reuse
        self.pool = BlockPool(cache.num_blocks, cache.block_size)
        self.B = cache.block_size
        self._free = list(range(max_seqs))
        self._live: set[int] = set()  # ids of admitted requests
        self._copies: list[tuple[int, int]] = []  # (src, dst) block copies due before the next forward

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.B)

    def total_blocks(self) -> int:
        return self.pool.num_blocks

    # ---- admission -------------------------------------------------------------------------
    def admit(self, req) -> bool:
        if not self._free:
            return False
        pool, prompt = self.pool, req.keys
        # at least the prompt's last token is fed again: its logits pick the first output
        m = pool.match(prompt, len(prompt) - 1 if self.prefix_reuse else 0)
        need = self.blocks_for(len(prompt) + req.max_tokens) - len(m.nodes)
        # cached blocks it takes back leave what the pool can promise
        revived = sum(1 for n in m.nodes if pool.ref[n.block] == 0)
        if m.copy_tokens and pool.ref[m.copy_from.block] == 0 and need + revived + 1 > pool.available():
            # the copy's source is held until copied: one block more than the request needs,
            # which a request as large as the whole pool never gets. Recompute those tokens.
            m.copy_from, m.copy_tokens = None, 0
        if need + revived > pool.available():
            return False
        s = _Seq()
        for n in m.nodes:
            pool.acquire(n.block)
            s.blocks.append(n.block)
            s.nodes.append(n)
        pool.reserve(need)
        s.reserved = need
        if m.copy_tokens:  # copy-on-write: the start of a block someone else owns
            pool.acquire(m.copy_from.block)  # kept from eviction until the copy is done
            self._copies.append((m.copy_from.block, self._grow(s)))
        req.slot = self._free.pop(0)
        req.computed = m.tokens
        req.kv = s
        self._live.add(req.id)
        self._publish_prompt(req, s, len(m.nodes))
        return True

    def _grow(self, s: _Seq) -> int:
        """One more block for s, out of its reservation."""
        if s.reserved < 1:
            raise RuntimeError("PagedKV: a sequence outgrew its reservation")
        s.reserved -= 1
        block = self.pool.allocate()
        s.blocks.append(block)
        s.nodes.append(None)
        s.dirty = True
        return block

    def _publish_prompt(self, req, s: _Seq, shared: int) -> None:
        """Put the prompt's other full blocks in the tree now, with this request as their writer,
        so a request admitted while it runs shares them instead of computing them again."""
        pool, B, prompt = self.pool, self.B, req.keys
        full = len(prompt) // B
        while len(s.blocks) < full:
            self._grow(s)
        parent = s.nodes[shared - 1] if shared else pool.root
        for i in range(shared, full):
            node = pool.insert(parent, tuple(prompt[i * B:(i + 1) * B]), s.blocks[i], req.id)
            if node is None:
                break
            s.nodes[i] = parent = node

    # ---- running ---------------------------------------------------------------------------
    def ready(self, req) -> bool:
        """False while a block it shares is still being computed by a live request. Blocks whose
        writer ended without finishing them become this request's to compute, but only when it
        waits for nobody else: the earliest admitted of their holders waits for no one who
        holds them, so someone always takes them and no two requests wait on each other."""
        s = req.kv
        while s.waits_from < len(s.nodes) and (s.nodes[s.waits_from] is None
                                               or s.nodes[s.waits_from].writer is None):
            s.waits_from += 1
        orphans = []
        for i in range(s.waits_from, len(s.nodes)):
            node = s.nodes[i]
            if node is None or node.writer is None or node.writer == req.id:
                continue
            if node.writer in self._live:
                return False
            orphans.append(i)
        if orphans:
            for i in orphans:
                s.nodes[i].writer = req.id
            back = min(req.computed, orphans[0] * self.B)  # recompute from the first one's start
            req.reused -= req.computed - back
            req.computed = back
        return True

    def prepare(self, steps) -> None:
        """steps: (req, n) for each request about to write positions computed..computed+n-1."""
        for src, dst in self._copies:
            self.cache.copy_block(src, dst)
            self.pool.release(src)
        self._copies.clear()
        for req, n in steps:
            s = req.kv
            while len(s.blocks) * self.B < req.computed + n:
                self._grow(s)
            if s.dirty:
                self.cache.set_blocks(req.slot, s.blocks)
                s.dirty = False

    def advance(self, req) -> None:
        """After a successful step: blocks it wrote to their end are written for everyone."""
        s, done = req.kv, req.computed // self.B
        for i in range(min(done, len(s.nodes))):
            node = s.nodes[i]
            if node is not None and node.writer == req.id:
                node.writer = None

    def release(self, req, kv_valid: bool) -> None:
        s, pool = req.kv, self.pool
        self._live.discard(req.id)
        for i, node in enumerate(s.nodes):
            if node is not None and node.writer == req.id and pool.ref[node.block] == 1 \
                    and pool.node_of.get(node.block) is node:
                pool.drop(node)  # never finished and nobody else waits for it
        if kv_valid:
            self._keep_for_reuse(req, s)
        for block in s.blocks:
            pool.release(block)
        pool.unreserve(s.reserved)
        s.reserved = 0
        self._free.append(req.slot)

    def _keep_for_reuse(self, req, s: _Seq) -> None:
        """Its private blocks, full ones and the tail, go into the tree (the next turn of a chat
        starts with this conversation)."""
        pool, B, tokens = self.pool, self.B, req.computed_keys()
        parent = pool.root
        for i, block in enumerate(s.blocks):
            node = s.nodes[i]
            if node is not None:
                if pool.node_of.get(block) is not node or node.writer is not None:
                    return
                parent = node
                continue
            part = tuple(tokens[i * B:(i + 1) * B])
            if not part:
                return
            node = pool.insert(parent, part, block, None)
            if node is None or len(part) < B:
                return
            parent = node

    def counts(self) -> dict:
        return dict(self.pool.counts(), kv_bytes_per_token=self.cache.bytes_per_token)

