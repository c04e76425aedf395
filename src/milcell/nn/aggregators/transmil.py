"""TransMIL: a transformer over the bag with a convolutional positional module (``transmil``).

Reference
---------
Zhuchen Shao, Hao Bian, Yang Chen, Yifeng Wang, Jian Zhang, Xiangyang Ji and Yongbing Zhang
(2021). "TransMIL: Transformer based Correlated Multiple Instance Learning for Whole Slide Image
Classification". *Advances in Neural Information Processing Systems (NeurIPS)* 34, 2136-2147.

The method, as implemented here (written from the paper), for a bag of ``n`` real instances:

1. each instance is projected, ``h_i = relu(W x_i)`` (width ``H``), and a learned class token
   is put in front of the sequence;
2. a first transformer layer, ``z = z + MSA(LayerNorm(z))`` (multi-head self-attention over the
   class token and the real instances);
3. PPEG, the pyramid position encoding generator: the instance tokens, in their order, fill a
   square grid of side ``ceil(sqrt(n))`` row by row, and depthwise convolutions of kernel 7, 5
   and 3 are added to the grid, ``g + conv7(g) + conv5(g) + conv3(g)``;
4. a second transformer layer, then LayerNorm; the bag embedding is the class token ``(H,)``.

Nyström attention is used by the paper for long bags; it is an option here (see
:class:`TransMILPooling`). References for the approximation: Yunyang Xiong, Zhanpeng Zeng,
Rudrasis Chakraborty, Mingxing Tan, Glenn Fung, Yin Li and Vikas Singh (2021).
"Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention". *AAAI* 35.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milcell._validation import check_choice, check_int, constraint_error
from milcell.nn.pooling import MILPooling, _check_dropout, _no_autocast, register_pooling

__all__ = ["TransMILPooling", "grid_side"]


def grid_side(n: Tensor) -> Tensor:
    """``ceil(sqrt(n))`` of non-negative integers, exactly, on their device (no host sync).

    Parameters
    ----------
    n : Tensor
        Integer tensor of any shape.

    Returns
    -------
    Tensor
        int64 tensor of the same shape: the side of the smallest square holding ``n`` cells.

    Examples
    --------
    >>> import torch
    >>> grid_side(torch.tensor([1, 2, 4, 5, 9, 10])).tolist()
    [1, 2, 2, 3, 3, 4]
    """
    n = n.long()
    side = torch.ceil(torch.sqrt(n.float())).long()  # float32: also on MPS
    side = side - ((side - 1) * (side - 1) >= n).long() * (side > 0).long()  # exact, whatever the rounding
    return side + (side * side < n).long()


class _Attention(nn.Module):
    """Multi-head self-attention of a pre-norm transformer layer (no feed-forward block, as in TransMIL)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout)

    def _split(self, t: Tensor) -> Tensor:  # (B, L, H) -> (B, heads, L, head_dim)
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def qkv_heads(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(self.norm(z)).chunk(3, dim=-1)
        return self._split(q), self._split(k), self._split(v)

    def merge(self, out: Tensor, dtype: torch.dtype) -> Tensor:  # (B, heads, L, hd) -> (B, L, H)
        return self.dropout(self.proj(out.transpose(1, 2).flatten(2).to(dtype)))


def _nystrom(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, landmarks: int, iterations: int) -> Tensor:
    """Masked Nyström approximation of ``softmax(q k^T / sqrt(d)) v``, per bag, in float32.

    ``q, k, v``: ``(B, h, L, d)`` float32; ``mask``: ``(B, L)`` bool (real tokens, at least one).
    The landmarks are segment means of each bag's own real tokens, in order (token of rank ``j``
    among ``L_i`` real ones goes to segment ``floor(j * m / L_i)``); a segment left empty
    (``L_i < m``) is not a landmark. The pseudo-inverse is the iterative one of Nyströmformer,
    with the initial scaling computed per bag and head. With ``L_i <= m`` every token is its
    own landmark and the result is exact up to the pseudo-inverse iteration. At most ``L``
    landmarks are used (``L`` from the shape): a bag with ``L_i <= L`` tokens has each token as
    its own landmark with ``m`` or with ``L`` slots alike, and empty slots only add identity
    blocks, which change neither the pseudo-inverse nor its initial scaling: batch independence
    holds.
    """
    b, h, length, d = q.shape
    landmarks = min(landmarks, length)
    scale = d**-0.5
    count_tokens = mask.sum(dim=1, keepdim=True)  # (B, 1)
    rank = mask.long().cumsum(dim=1) - 1
    segment = torch.where(mask, (rank * landmarks) // count_tokens, landmarks)  # masked -> dump slot
    index = segment.view(b, 1, length, 1).expand(b, h, length, d)
    q_l = torch.zeros(b, h, landmarks + 1, d, dtype=q.dtype, device=q.device).scatter_add(2, index, q)
    k_l = torch.zeros_like(q_l).scatter_add(2, index, k)
    counts = torch.zeros(b, landmarks + 1, dtype=q.dtype, device=q.device).scatter_add(
        1, segment, torch.ones_like(segment, dtype=q.dtype)
    )[:, :landmarks]
    valid = counts > 0  # (B, m)
    denom = counts.clamp_min(1).view(b, 1, landmarks, 1)
    q_l, k_l = q_l[:, :, :landmarks] / denom, k_l[:, :, :landmarks] / denom
    vl = valid.view(b, 1, 1, landmarks)
    keys = mask.view(b, 1, 1, length)
    k1 = torch.softmax(torch.where(vl, q @ k_l.transpose(-1, -2) * scale, float("-inf")), dim=-1)
    k1 = torch.where(vl, k1, 0.0)  # (B, h, L, m)
    k2 = torch.softmax(torch.where(vl, q_l @ k_l.transpose(-1, -2) * scale, float("-inf")), dim=-1)
    eye = torch.eye(landmarks, dtype=q.dtype, device=q.device)
    k2 = torch.where(valid.view(b, 1, landmarks, 1) & vl, k2, eye)  # an empty landmark: identity block
    k3 = torch.softmax(torch.where(keys, q_l @ k.transpose(-1, -2) * scale, float("-inf")), dim=-1)
    k3 = torch.where(keys, k3, 0.0)  # (B, h, m, L)
    # Newton-Schulz iteration for the Moore-Penrose pseudo-inverse of k2 (Nyströmformer, eq. 11)
    a = k2.abs()
    z = k2.transpose(-1, -2) / (
        a.sum(dim=-1).amax(dim=-1, keepdim=True) * a.sum(dim=-2).amax(dim=-1, keepdim=True)
    ).unsqueeze(-1)
    for _ in range(iterations):
        kz = k2 @ z
        z = 0.25 * z @ (13 * eye - kz @ (15 * eye - kz @ (7 * eye - kz)))
    return (k1 @ z) @ (k3 @ v)


@register_pooling("transmil")
class TransMILPooling(MILPooling):
    """TransMIL (Shao et al., NeurIPS 2021): class token, two transformer layers and PPEG.

    See the module docstring for the method. It is embedding-level: the bag embedding is the
    class token ``(B, hidden)``, and the paper's linear classifier is the fusion head of
    :class:`~milcell.nn.MILModel`. The returned weights are the class token's attention over
    the real instances in the last layer, averaged over the heads and renormalised over the
    instances (the class token's attention to itself left out), so they sum to 1.

    **Not permutation-invariant**: PPEG places the instances on the grid in their order in the
    bag (masked positions skipped), so reordering a bag changes its embedding, as in the paper.
    What does hold, exactly:

    * padding: masked positions never enter any computation (they are never attended to, never
      placed on the grid), whatever they hold and wherever they are;
    * batch independence: each bag's grid has side ``ceil(sqrt(n_i))`` from its own ``n_i``
      (computed on the device); the grids share one tensor of side ``ceil(sqrt(N_max))`` whose
      cells outside a bag's own real instances are zero, which is exactly the zero padding a
      single-bag convolution sees. The paper fills the square's spare cells with copies of the
      first instances and lets them be attended to; here they are empty (zero before the
      convolutions, never attended to), so a bag's output depends on its instances only.

    Attention: exact by default (:func:`torch.nn.functional.scaled_dot_product_attention` with
    a boolean mask, in float32 with autocast off). ``attention="nystrom"`` replaces the first
    layer's ``(n + 1)^2`` attention by the Nyström approximation the paper uses, linear in
    ``n``: ``landmarks`` segment means of each bag's own real tokens (fewer when the bag is
    shorter: then it is exact up to the pseudo-inverse iteration), ``pinv_iterations`` steps of
    the iterative pseudo-inverse, everything masked and per bag (Nyströmformer's extra
    depthwise convolution over the values, which would see the padding, is left out). The last
    layer only needs the class token's row, which is computed exactly in ``O(n)`` in both modes.

    Parameters
    ----------
    in_dim : int
        Feature size ``D``.
    hidden : int, default 512
        Token width ``H`` (``out_dim``); a multiple of ``heads``.
    heads : int, default 8
        Number of attention heads.
    attention : {"exact", "nystrom"}, default "exact"
        Attention of the first layer.
    landmarks : int, default 256
        Number of Nyström landmarks (the paper: ``H // 2``).
    pinv_iterations : int, default 6
        Iterations of the Nyström pseudo-inverse.
    dropout : float, default 0.1
        Dropout on the attention weights and the attention outputs (training only; the paper's
        attention dropout).

    Examples
    --------
    >>> import torch
    >>> from milcell.nn.pooling import create_pooling
    >>> pool = create_pooling("transmil", 6, hidden=16, heads=2).eval()
    >>> x, mask = torch.randn(2, 5, 6), torch.tensor([[True, True, True, False, False], [True] * 5])
    >>> emb, w = pool(x, mask, return_attention=True)
    >>> emb.shape, w[0, 3:].tolist(), round(w[0].sum().item(), 4)
    (torch.Size([2, 16]), [0.0, 0.0], 1.0)
    >>> alone = pool(x[:1, :3], mask[:1, :3])  # the same bag without padding
    >>> torch.allclose(alone, emb[:1], atol=1e-5)
    True
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int = 512,
        heads: int = 8,
        attention: str = "exact",
        landmarks: int = 256,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_dim)
        self.hidden = check_int(hidden, "hidden", low=1)
        self.heads = check_int(heads, "heads", low=1)
        if self.hidden % self.heads:
            raise constraint_error("hidden", f"a multiple of heads={self.heads}", hidden)
        self.attention = check_choice(attention, "attention", ("exact", "nystrom"))
        self.landmarks = check_int(landmarks, "landmarks", low=1)
        self.pinv_iterations = check_int(pinv_iterations, "pinv_iterations", low=0)
        self.dropout_p = _check_dropout(dropout)
        self.out_dim = self.hidden
        self.project = nn.Linear(self.in_dim, self.hidden)
        self.cls_token = nn.Parameter(torch.randn(1, 1, self.hidden) * 0.02)
        self.layer1 = _Attention(self.hidden, self.heads, self.dropout_p)
        self.ppeg = nn.ModuleList(  # depthwise convolutions of kernel 7, 5 and 3
            nn.Conv2d(self.hidden, self.hidden, s, padding=s // 2, groups=self.hidden) for s in (7, 5, 3)
        )
        self.layer2 = _Attention(self.hidden, self.heads, self.dropout_p)
        self.norm = nn.LayerNorm(self.hidden)

    # -- the three stages ------------------------------------------------------------------------
    def _first_layer(self, z: Tensor, keys: Tensor) -> Tensor:
        layer = self.layer1
        q, k, v = layer.qkv_heads(z)
        with _no_autocast(z.device):
            q, k, v = q.float(), k.float(), v.float()
            if self.attention == "exact":
                out = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=keys.view(keys.shape[0], 1, 1, keys.shape[1]),
                    dropout_p=self.dropout_p if self.training else 0.0,
                )
            else:
                out = _nystrom(q, k, v, keys, self.landmarks, self.pinv_iterations)
        return z + layer.merge(out, z.dtype)

    def _ppeg(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """PPEG over each bag's own square of its real instances; ``tokens`` ``(B, N, H)``, 0 where masked."""
        b, n_max, width = tokens.shape
        side_max = math.isqrt(n_max - 1) + 1  # ceil(sqrt(N_max)), from the shape: no sync
        cells = side_max * side_max
        n = mask.sum(dim=1, keepdim=True)  # (B, 1)
        side = grid_side(n).clamp_min(1)  # (B, 1), each bag's own square
        # grid cell -> source token: cell (r, c) holds the bag's real instance of rank r * side + c
        cell = torch.arange(cells, device=tokens.device).view(1, cells)
        row, col = cell // side_max, cell % side_max
        rank = row * side + col
        filled = (col < side) & (rank < n)  # (B, cells)
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # real positions first
        source = order.gather(1, rank.clamp(max=n_max - 1))
        grid = tokens.gather(1, source.unsqueeze(-1).expand(b, cells, width))
        grid = torch.where(filled.unsqueeze(-1), grid, torch.zeros((), dtype=grid.dtype, device=grid.device))
        g = grid.transpose(1, 2).reshape(b, width, side_max, side_max)
        g = g + sum(conv(g) for conv in self.ppeg)
        g = g.flatten(2).transpose(1, 2)  # (B, cells, H)
        # token -> its cell
        token_rank = mask.long().cumsum(dim=1) - 1
        token_cell = torch.where(mask, (token_rank // side) * side_max + token_rank % side, 0)
        out = g.gather(1, token_cell.unsqueeze(-1).expand(b, n_max, width))
        return torch.where(mask.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))

    def _last_layer(self, z: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """The class token's row of the second layer: its new value ``(B, H)`` and attention ``(B, N)``."""
        layer = self.layer2
        normed = layer.norm(z)
        w_q, w_kv = layer.qkv.weight.split([self.hidden, 2 * self.hidden])
        q = layer._split(F.linear(normed[:, :1], w_q))  # only the class token's query is needed
        k, v = (layer._split(t) for t in F.linear(normed, w_kv).chunk(2, dim=-1))
        with _no_autocast(z.device):
            s = (q.float() @ k.float().transpose(-1, -2)) * layer.head_dim**-0.5  # (B, h, 1, L)
            m = keys.view(keys.shape[0], 1, 1, keys.shape[1])
            w = torch.where(m, torch.softmax(torch.where(m, s, float("-inf")), dim=-1), 0.0)
            mixed = F.dropout(w, self.dropout_p, self.training) @ v.float()
            inst = w[:, :, 0, 1:].mean(dim=1)  # (B, N): heads averaged, the class token left out
            inst = inst / inst.sum(dim=1, keepdim=True)
        return z[:, 0] + layer.merge(mixed, z.dtype)[:, 0], inst

    def _pool(self, x: Tensor, mask: Tensor, clinical: Tensor | None) -> tuple[Tensor, Tensor]:
        b = x.shape[0]
        m = mask.unsqueeze(-1)
        tokens = torch.relu(self.project(x))
        zero = torch.zeros((), dtype=tokens.dtype, device=x.device)
        tokens = torch.where(m, tokens, zero)
        keys = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), mask], dim=1)  # (B, 1 + N)
        z = torch.cat([self.cls_token.to(tokens.dtype).expand(b, 1, self.hidden), tokens], dim=1)
        z = self._first_layer(z, keys)
        inst = torch.where(m, z[:, 1:], zero.to(z.dtype))
        z = torch.cat([z[:, :1], self._ppeg(inst, mask).to(z.dtype)], dim=1)
        cls, weights = self._last_layer(z, keys)
        return self.norm(cls), weights

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, heads={self.heads}, attention={self.attention!r}, "
            f"landmarks={self.landmarks}"
        )
