"""What an architecture says about a configured model, for everyone who must count before loading.

Each model class answers `facts(config) -> ModelFacts`; memory planning (hybrid/runtime/memory.py),
the planner's ModelSpec (hybrid/models/spec.py), the cost model, the engine's KV budget and
`hybrid doctor` read these numbers instead of re-deriving an architecture's formulas.

Device tensor groups (each may be stored dense in the compute dtype, or int8/fp8 weight-only):
  attention  the attention projections   shared  shared-expert MLPs
  dense      dense-layer MLPs            lm_head the output projection
"""

from __future__ import annotations

from dataclasses import dataclass, field

GROUPS = ("attention", "shared", "dense", "lm_head")


@dataclass(frozen=True)
class ModelFacts:
    model_type: str
    num_layers: int                      # all decoder layers
    moe_layers: tuple[int, ...]          # decoder-layer indices of the MoE layers
    hidden: int                          # H
    vocab: int
    num_experts: int                     # routed experts per MoE layer (E)
    top_k: int                           # experts picked per token (K)
    expert_width: int                    # I
    shared_width: int                    # shared-expert MLP width per MoE layer (0: none)
    dense_width: int                     # dense-layer MLP width
    tie_word_embeddings: bool
    # Per device tensor group: its matrices (rows, cols); rows count per-row scales when quantised.
    group_matrices: dict = field(default_factory=dict)
    always_dense_params: int = 0         # device params always in the compute dtype (norms, kv_b, ...)
    dense_attention_per_layer: int = 0   # of which attention matrices kept dense, per layer (MLA's kv_b)
    router_params: int = 0               # router weights + biases, held in fp32
    kv_elements_per_token: int = 0       # KV cache elements one token costs, all layers together
    attention_heads: int = 0             # query heads
    attention_key_width: int = 0         # elements per head per key when keys/values are expanded
    attention_out_width: int = 0         # width of the attention output before o_proj (nh x V)
    attention_flops_per_key: int = 0     # per query token, per context key, one layer

    def group_params(self) -> dict[str, tuple[int, int]]:
        """Per group: (matrix parameters, matrix rows)."""
        return {g: (sum(n * k for n, k in ms), sum(n for n, _ in ms)) for g, ms in self.group_matrices.items()}

    def kv_bytes_per_token(self, itemsize: int = 2) -> int:
        return self.kv_elements_per_token * itemsize

    @property
    def expert_params(self) -> int:
        """One routed expert: gate, up [I, H] and down [H, I]."""
        return 3 * self.hidden * self.expert_width

    @property
    def attention_params_per_layer(self) -> int:
        n_attn = self.group_params().get("attention", (0, 0))[0]
        return n_attn // max(1, self.num_layers) + self.dense_attention_per_layer

    def activation_bytes(self, chunk: int, itemsize: int, quantised: bool) -> int:
        """Device working set of one prefill chunk of `chunk` tokens (without the allocator reserve):
        residual and MLP buffers, expanded keys/values, attention scores (capped where attention is
        split, hybrid/ops/attention.py), a row of logits, and the dequantisation temporary of
        weight-only linears (hybrid/ops/linear.py)."""
        from hybrid.ops.linear import DEQUANT_ROWS
        from hybrid.ops.attention import SCORES_BUDGET

        H, nh = self.hidden, self.attention_heads
        width = max(self.dense_width, self.shared_width, self.expert_width)
        return (4 * chunk * H * 4  # residual, normed, attention out, MLP out (fp32 worst case)
                + 3 * chunk * width * itemsize  # gate, up, product
                + 4 * chunk * nh * self.attention_key_width * itemsize  # expanded keys/values (L <= 4 chunk)
                + min(nh * chunk * 4 * chunk * 4, SCORES_BUDGET)  # scores when no fused kernel fits
                + self.vocab * 4  # one row of logits
                + (DEQUANT_ROWS * max(H, width, self.attention_out_width) * itemsize if quantised else 0))
