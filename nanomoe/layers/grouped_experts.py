"""
The grouped (fast) path of the MoE experts: Experts.forward_loop's result (moe_model.py) with static shapes
and one grouped matrix multiply per projection instead of a Python loop over experts.

    x_TD, expert_TK -> sort the A = T*K assignments by expert -> x_AD, each expert's rows together
                    -> grouped GEMM with c_fc, activation, grouped GEMM with c_proj -> out_AD
                    -> scale by the routing weights, scatter-add back -> y_TD

torch._grouped_mm (torch >= 2.8) multiplies block e of the rows of x_AI by w_EIO[e], the blocks given by
each expert's end offset. What it takes (ATen's GroupedMMUtils.h and cuda/GroupedBlas.cpp, torch 2.13's
torch/_meta_registrations.py; the CPU lines checked by tests/test_moe_grouped.py):
- eager on the CPU: float32, bfloat16 and float16. It runs one matmul per expert in C++, the loop's matmuls
  (bit-identical outputs and gradients without biases), without the loop's torch.where per expert.
- eager on CUDA: the same three dtypes. bfloat16 on sm90/sm100 (H100, B200) runs the CUTLASS grouped
  kernel; the rest run one matmul per expert after copying the offsets to the host (a sync, like the loop).
- under torch.compile: bfloat16 only; the shape function that tracing runs rejects other dtypes.
- everywhere: each row of both operands a multiple of 16 bytes (in_features a multiple of 4 in float32,
  of 8 in bfloat16).
Where it does not run, grouped_linear falls back to masked dense matmuls with the same static shapes.
"""
import torch
import torch.nn.functional as F

from nanomoe.layers.moe_stages import stage

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def compute_dtype(x):
    """The dtype matmuls run in: autocast's where it is on (LayerNorm hands us float32 even then)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_kernel_available(device_type, dtype, in_features=()):
    """Whether torch._grouped_mm takes matmuls with these in_features on this device in this dtype (the list
    in the module docstring). Other devices (MPS) are untested, so they get the fallback."""
    if not hasattr(torch, "_grouped_mm") or device_type not in ("cuda", "cpu"):
        return False
    if not all(n * dtype.itemsize % 16 == 0 for n in in_features):
        return False
    if torch.compiler.is_compiling():
        return dtype == torch.bfloat16
    return dtype in KERNEL_DTYPES


def expert_counts(expert_TK, n_experts):
    """How many of the assignments expert_TK go to each expert: (E,) int32, on the device, with a static shape
    (bincount's depends on the data)."""
    expert_A = expert_TK.flatten()
    return torch.zeros(n_experts, dtype=torch.int32, device=expert_A.device).scatter_add_(
        0, expert_A, torch.ones_like(expert_A, dtype=torch.int32))


def grouped_experts(experts, x_TD, expert_TK, weight_TK, keep_TK, counts_E=None):
    """Experts.forward_loop's result with static shapes: sort the T*K assignments by expert, gather their
    tokens once, run all experts with one grouped matmul per projection, scatter back. Dropped assignments
    are computed too (a fixed shape beats a data-dependent one) and then weighted by 0. counts_E: the
    assignments per expert (expert_counts), if the caller has them."""
    T, K = expert_TK.shape
    E = experts.c_fc.size(0)
    expert_A = expert_TK.flatten()  # (A,) with A = T*K assignments, token-major
    with stage("count"):
        if counts_E is None:
            counts_E = expert_counts(expert_TK, E)
        offsets_E = counts_E.cumsum(0, dtype=torch.int32)  # end of each expert's rows in the sorted order
    with stage("permute"):
        # assignments grouped by expert: one sort gives both the order and the sorted experts (no gather)
        expert_sorted_A, order_A = expert_A.sort(stable=True)
        token_A = order_A // K  # which token each sorted assignment belongs to
        # gathers with index_select, whose backward is an index_add_ (x_TD[token_A]'s is a slower index_put_)
        x_AD = x_TD.index_select(0, token_A).to(compute_dtype(x_TD))  # autocast: bf16 here, grouped GEMMs take none
    with stage("experts"):
        h_AF = grouped_linear(x_AD, experts.c_fc, offsets_E, expert_sorted_A)
        if experts.c_fc_bias is not None:
            h_AF = h_AF + experts.c_fc_bias.index_select(0, expert_sorted_A).to(h_AF.dtype)
        out_AD = grouped_linear(experts.activation(h_AF), experts.c_proj, offsets_E, expert_sorted_A)
        if experts.c_proj_bias is not None:
            out_AD = out_AD + experts.c_proj_bias.index_select(0, expert_sorted_A).to(out_AD.dtype)
    with stage("combine"):
        w_A = (weight_TK * keep_TK).flatten().index_select(0, order_A)  # routing weights in float32
        y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        y_TD.index_add_(0, token_A, out_AD.float() * w_A.unsqueeze(1))
        return y_TD.to(x_TD.dtype)


def grouped_linear(x_AI, w_EOI, offsets_E, expert_A):
    """Row a of x_AI times expert expert_A[a]'s weight w_EOI[e] (out, in), for rows sorted by expert
    (offsets_E[e] = end of expert e's rows). -> (A, O)"""
    if grouped_kernel_available(x_AI.device.type, x_AI.dtype, (x_AI.size(1),)):
        # one call for all experts; it takes no autocast, so the weights are cast explicitly
        return torch._grouped_mm(x_AI, w_EOI.to(x_AI.dtype).transpose(-2, -1), offs=offsets_E)
    # Fallback for what the kernel does not take, and the reason it stays: moe_impl='grouped' under
    # torch.compile in float32 or float16 (the compile test runs here), row sizes off the 16-byte grid, MPS,
    # torch < 2.8. Same static shapes: every expert multiplies every row and a mask keeps the rows that are
    # its own. E times the FLOPs of the kernel: for compiling and checking, not for speed.
    out_AO = x_AI.new_zeros(x_AI.size(0), w_EOI.size(1))
    for e in range(w_EOI.size(0)):
        mine_A1 = (expert_A == e).unsqueeze(1).to(x_AI.dtype)
        out_AO = out_AO + mine_A1 * F.linear(x_AI, w_EOI[e].to(x_AI.dtype))
    return out_AO
