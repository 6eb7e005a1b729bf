"""``nystrom``: Nystromformer (Xiong et al., AAAI 2021), on the ``nystrom-attention`` package.

Per head, with q already scaled by 1/sqrt(d), landmarks Q~, K~ (m x d) are segment means of Q and
K along the sequence, and

    A_F = softmax(Q K~^T) (N x m),   A = softmax(Q~ K~^T) (m x m),   A_B = softmax(Q~ K^T) (m x N)
    Y = A_F pinv(A) (A_B V)  [+ DWConv(V)]                      (paper eq. 15)

pinv(A) by the package's iterative Moore-Penrose scheme: Z_0 = A^T / (max column sum * max row sum
of |A|, both over the whole batch), then ``pinv_iterations`` times
Z <- Z (13I - AZ(15I - AZ(7I - AZ))) / 4, under which E = I - AZ becomes (3E^3 + E^4) / 4.
When m = N every landmark is a token and Y equals softmax attention (checked in the tests).

``landmark_segments`` chooses the segments:
 - ``"even"`` (default): the N tokens (prefix tokens included, raster order) are cut into exactly m
   contiguous segments whose lengths differ by at most one, the first N mod m of them one token
   longer (as ``numpy.array_split``); each landmark is its segment's mean (the paper's segment
   means, generalised to N not divisible by m). At N=197, m=64: 5 segments of 4 tokens, then 59
   of 3. No padding, no mask. For N < m every token is its own landmark (m = N: softmax attention,
   plus the residual conv).
 - ``"package"``: the package's own forward, kept to reproduce its results. It front-pads the
   sequence with zeros to a multiple of m and cuts it into m segments of l = ceil(N/m) positions;
   we pass a mask so that the padding is ignored. Segments of padding only are masked out, so just
   m - floor(pad / l) landmarks are real: at N=197, m=64 (padded to 256, l=4) 14 segments are pure
   padding, one holds the CLS token alone (3 padding positions + token 0) and 49 hold 4 tokens,
   i.e. **50** effective landmarks (49 at N=196). The output equals the exact Nystrom on these
   effective segments (the masked landmarks get zero weight in A_F; checked in the tests).
``effective_landmarks(N)`` gives the number of landmarks really used. Both modes run on the
parameters of the package module ``self.attn`` (to_qkv, res_conv, to_out): one state_dict, one
parameter count.

Defaults: ``num_landmarks=64`` (the paper's LRA/ViT setting; the package default is 256, more than
a ViT's 197 tokens), ``landmark_segments="even"``, ``pinv_iterations=6``, ``residual=True``
(depthwise conv over V along the sequence, kernel ``residual_conv_kernel=33``, as the package).
Complexity: O(N m d + m^3) time, O(N m + m^2) memory per head. Input: any N (1-D segments in
raster order); ``grid`` validated, unused.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._base import BaselineAttention, from_heads, segment_bounds, segment_means, to_heads
from ._registry import register

LANDMARK_SEGMENTS = ("even", "package")


def even_landmarks(x: torch.Tensor, m: int) -> torch.Tensor:
    """Means of (..., N, d) ``x`` over the segments ``segment_bounds(N, m)``: (..., m, d)."""
    return segment_means(x, segment_bounds(x.shape[-2], m))


def package_nystrom(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The package's forward on x (B, N, dim). When N is not a multiple of m the package
    front-pads with zeros; an all-True mask makes it ignore the padding (as keys, queries and
    landmarks)."""
    mask = None
    if x.shape[1] % attn.num_landmarks:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return attn(x, mask=mask)


def _pinv(a: torch.Tensor, iters: int) -> torch.Tensor:
    """The package's iterative Moore-Penrose pseudo-inverse (imported when first used)."""
    from nystrom_attention.nystrom_attention import moore_penrose_iter_pinv

    return moore_penrose_iter_pinv(a, iters)


@register("nystrom", requires=(("nystrom_attention", "nystrom-attention"),))
class NystromAttention(BaselineAttention):
    def __init__(self, dim, num_heads=8, *, num_prefix_tokens=0, qkv_bias=False,
                 num_landmarks=64, landmark_segments="even", pinv_iterations=6, residual=True,
                 residual_conv_kernel=33):
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, make_qkv=False)
        if landmark_segments not in LANDMARK_SEGMENTS:
            accepted = ", ".join(map(repr, LANDMARK_SEGMENTS))
            raise ValueError(f"nystrom: landmark_segments must be one of {accepted}, "
                             f"got {landmark_segments!r}")
        if not isinstance(num_landmarks, int) or num_landmarks < 1:
            raise ValueError(f"nystrom: num_landmarks must be a positive int, "
                             f"got {num_landmarks!r}")
        from nystrom_attention import NystromAttention as _Nys

        self.attn = _Nys(dim, dim_head=self.head_dim, heads=num_heads, num_landmarks=num_landmarks,
                         pinv_iterations=pinv_iterations, residual=residual,
                         residual_conv_kernel=residual_conv_kernel)
        if qkv_bias:
            self.attn.to_qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.num_landmarks = num_landmarks
        self.landmark_segments = landmark_segments

    def effective_landmarks(self, num_tokens: int) -> int:
        """Number of landmarks really used for a sequence of ``num_tokens`` tokens."""
        n, m = int(num_tokens), self.num_landmarks
        if n < 1:
            raise ValueError(f"nystrom: num_tokens must be >= 1, got {num_tokens!r}")
        if self.landmark_segments == "even":
            return min(n, m)
        seg = -(-n // m)                      # package: m segments of ceil(n/m) padded positions
        return m - (m * seg - n) // seg       # minus the segments made of front padding only

    def forward(self, x, grid=None):
        self.check_input(x, grid)
        if self.landmark_segments == "package":
            return package_nystrom(self.attn, x)
        a = self.attn
        q, k, v = (to_heads(t, self.num_heads) for t in a.to_qkv(x).chunk(3, dim=-1))
        q = q * a.scale
        m = min(self.num_landmarks, x.shape[1])
        q_l, k_l = even_landmarks(q, m), even_landmarks(k, m)
        a_f = torch.softmax(q @ k_l.transpose(-2, -1), dim=-1)        # (B, h, N, m)
        a_l = torch.softmax(q_l @ k_l.transpose(-2, -1), dim=-1)      # (B, h, m, m)
        a_b = torch.softmax(q_l @ k.transpose(-2, -1), dim=-1)        # (B, h, m, N)
        out = (a_f @ _pinv(a_l, a.pinv_iterations)) @ (a_b @ v)
        if a.residual:
            out = out + a.res_conv(v)
        return a.to_out(from_heads(out))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_landmarks={self.num_landmarks}, "
                f"landmark_segments={self.landmark_segments!r}, "
                f"pinv_iterations={self.attn.pinv_iterations}")
