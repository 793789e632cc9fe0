r"""GaLore AdamW: Adam (or AdamP, or SMMF) in a periodically refreshed low-rank gradient subspace.

Zhao, Zhang, Chen, Wang, Anandkumar, Tian, "GaLore: Memory-Efficient LLM Training by Gradient
Low-Rank Projection", ICML 2024, arXiv:2403.03507.  Semantics, defaults and the exact update of
``galore_torch.GaLoreAdamW`` (galore-torch 1.0), which the tests use as an oracle; the code is our
own.

For a parameter in a low-rank group (a group with a ``rank`` key), viewed as an ``(m, n)``
matrix with gradient :math:`G_t`, at its step :math:`t` (per parameter, counted from 0)::

    if t is a refresh step (t + offset) % T == 0, or there is no basis yet:
        P <- basis(G_t)                                   # svd / randomized / dct / random
        moments <- on_refresh(moments, P_old, P)          # keep (GaLore) / rotate / reset
    R   = G_t P^T              (right, keeps m)   or   P^T G_t   (left, keeps n)
    M   = b1 M + (1 - b1) R ;  V = b2 V + (1 - b2) R^2
    N   = M / (sqrt(V) + eps)
    W  -= lr * sqrt(1 - b2^t') / (1 - b1^t') * scale * (N P   or   P N)     # t' = t + 1
    W  -= lr * weight_decay * W                           # decoupled, after the update

(``correct_bias=False`` drops the two bias corrections.)  Parameters of groups without ``rank``,
and 0-/1-D parameters, get the same AdamW update on the full gradient (galore-torch's AdamW: note
``eps`` is added to ``sqrt(V)`` before the bias correction and weight decay comes after the
update, unlike ``torch.optim.AdamW``).

Memory traffic (:mod:`optimlib.bench.traffic`), per fp32 element of a projected ``(m, n)`` weight
with ``n <= m``: the gradient read (4 bytes) and the weight read and written (8) -- the two thin
matmuls read them -- plus the low-rank moments and the basis, each ``r/n`` of the weight's size,
read and written once; the ``adamp`` rule adds a second read of the weight and the update (8).

Inner rules (``inner``, a constructor argument or a group key; ``galore_adamp`` / ``galore_smmf``
in the factory).  The projection piece is the same for every rule; what runs on the projected
gradient ``R`` (and, on the full gradient, for the parameters outside the low-rank groups) is:

``adamw`` (default)
    the update above, bit for bit galore-torch's.
``adamp``
    AdamP (Heo et al., ICLR 2021, arXiv:2006.08217; :mod:`optimlib.optim.adamp`).  Its Adam part
    runs on the low-rank moments (:func:`optimlib.kernels.adam_lowrank_update_` with AdamP's bias
    correction ``N = M / (sqrt(V) / sqrt(1 - b2^t) + eps)``, Nesterov optional).  Its
    scale-invariance test and radial projection need the weight, which has no low-rank
    counterpart, so they act on the **back-projected full-size update** ``U = scale * up(N)``:
    when ``max |cos(G_row, W_row)| < delta / sqrt(n)`` (channel view) or ``|cos(G, W)| < delta /
    sqrt(m n)`` (layer view) -- ``G`` the full gradient, as AdamP tests the gradient, not the
    update -- the component of ``U`` along each row of ``W`` (or along ``W``) is removed and the
    weight decay is multiplied by ``wd_ratio``
    (:func:`optimlib.optim.adamp.scale_invariant_projection`, on row shards with one 5-number
    collective).  Then ``W <- W (1 - lr wd wd_factor) - lr / (1 - b1^t) U``.  Group keys
    ``delta`` (0.1), ``wd_ratio`` (0.1), ``nesterov`` (False); ``correct_bias`` is ignored.
``smmf``
    SMMF (Park & Lee, AAAI 2025, arXiv:2412.08894; :mod:`optimlib.optim.smmf`).  The low-rank
    moments -- the ``(m, r)`` matrix of a right projection, the transpose of the ``(r, n)`` one
    of a left projection -- are stored as SMMF stores any tensor: square-matricized, rank-1
    factors of ``|M|`` and ``V`` plus the 1-bit packed sign of ``M``
    (:class:`optimlib.optim.smmf.SMMFLayout`), updated with SMMF's schedules ``b1_t = betas[0] *
    growth_rate^(t-1)``, ``b2_t = 1 - t^decay_rate`` (``betas[1]`` is not used) and no bias
    correction; then ``W <- W (1 - lr wd) - lr * scale * up(M / (sqrt(V) + eps))``.  Row shards
    of the low-rank moments are pieces of that flattened matrix (SMMF's column factors take one
    all-reduce of ``2 cols`` numbers).  Group keys ``decay_rate`` (-0.5; the SMMF README advises
    -0.8 for Transformers), ``growth_rate`` (0.999); ``moments_dtype`` must be ``None``.

Refresh policies with ``inner="smmf"``: ``keep`` reuses the factors as coordinates in the new
basis (nothing is touched when the rank does not change; a rank change re-factorizes the leading
columns); ``rotate`` decompresses ``M`` and ``V`` to the dense low-rank moments (one transient
``K x r`` pair), rotates them as above (``M O``, ``V (O * O)``) and re-factorizes them -- exact
when ``|M O|`` stays rank 1 in SMMF's matrix view (a signed permutation of the basis), otherwise
the rotated moments get SMMF's usual rank-1 approximation; ``reset`` zeroes the factors and
restarts SMMF's schedules (``b2_1 = 0``: the next ``V`` is the squared projected gradient).

With the identity as basis and ``scale=1`` the projected space is the full space and
``inner="adamp"`` / ``"smmf"`` reduce to AdamP / SMMF bit for bit (tests/optim/test_galore_inner.py).

Kernels: the step runs on the custom ops of :mod:`optimlib.kernels` -- the Adam moment
update on the projected gradient (``adam_lowrank_update_``; ``adam8bit_lowrank_update_`` for 8-bit
moments), SMMF's step (``smmf_update_``) and the back-projection fused with the weight update and
decay (``galore_backproject_update_``; AdamP's rule projects the back-projected update first, so it
back-projects with a matmul) -- Triton kernels on CUDA tensors, their PyTorch twins elsewhere, so
CPU and GPU run the same code above the op boundary (``OPTIMLIB_KERNELS`` forces either).  The
parameters outside the low-rank groups take galore-torch's AdamW as ``torch._foreach_*``
multi-tensor ops over the group.  Between basis refreshes ``step()`` compiles under
``torch.compile(fullgraph=True)`` (tests/optim/test_optimizer_compile.py).

Low-rank group keys (galore-torch's, with its defaults where it has them): ``rank`` (int or
``"auto"``), ``update_proj_gap`` (T, 200), ``scale`` (0.25), ``proj_type`` (``std``,
``reverse_std``, ``left``, ``right``).  Ours: ``projection`` (``auto``, ``svd``, ``randomized``,
``dct``, ``random``; see :mod:`optimlib.optim.galore.projection`), ``on_refresh`` (``keep``: the old
moments are reused as coordinates in the new basis, GaLore's behaviour; ``rotate``: moments are
mapped into the new basis, ``M <- M O``, ``V <- V (O * O)`` with ``O`` the ``r_old x r_new``
overlap of the bases, i.e. the variance of independent coordinates is carried over; ``reset``:
zero moments and restart the bias correction), ``stagger`` (spread the refresh steps of the
parameters over the gap instead of refreshing all of them on the same step), ``energy``,
``min_rank``, ``max_rank`` (adaptive rank), ``oversample``, ``power_iters`` (randomized),
``dct_norm``, ``moments_dtype`` (``None``: the gradient's dtype; ``"int8"``: 8-bit blockwise
quantized low-rank moments, :mod:`optimlib.formats.quantize`), ``quant_block``,
``stochastic_rounding``, ``basis_dtype`` (``None``: the gradient's dtype, as galore-torch;
``"float32"``), ``seed``, ``canonical_signs`` and ``shard_basis`` (see the class).  galore-torch
requires ``update_proj_gap``, ``scale`` and ``proj_type`` in every low-rank group; the defaults
here are Hugging Face's (200, 0.25, ``std``).

Drop-in exactness: with ``projection="svd"`` and ``canonical_signs=False``, one process gives
galore-torch's parameters to the bit (fp32; tests/optim/test_galore*.py).  The default
``canonical_signs=True`` flips singular vectors to a canonical sign so that runs do not depend on
LAPACK's sign choice, which a rounding-level change of the gradient (data-parallel averaging)
can flip; with ``on_refresh="keep"`` such a flip changes the trajectory (see
:mod:`optimlib.optim.galore.projection`).

Distributed. Every parameter is reached through :meth:`OptimizerBase.param_units` and a
:class:`optimlib.distributed.RowBlock`: plain tensors, FSDP2 DTensors (``Shard(0)``, uneven
included) and DeepSpeed ZeRO-1/2/3 flat partitions (any grouping: a partition is mapped back to
its parameters) all run the same code. The low-rank moments live in the layout of
:class:`optimlib.optim.galore.projection.Projector` (this rank's rows of the ``(m, r)`` moments of a
right projection, its ``torch.chunk`` block of the columns of the ``(r, n)`` moments of a left
one), so optimizer state shrinks with the number of ranks; under FSDP2 they are DTensors sharded
on the kept dimension so that ``torch.distributed.checkpoint`` saves every rank's piece. Step
counters are per parameter (ZeRO-3 calls ``step()`` once per sub-group). Collectives per
low-rank parameter and step: for a right projection none, except one all-gather of the ``r x n``
basis when it is stored sharded (``shard_basis``, svd/randomized bases); for a left one an
all-reduce of the ``r x n`` projected gradient and an all-gather of the ``r x n`` update (plus
RowBlock's exchange of one row per rank when DeepSpeed slices start mid-row); refreshes as
described in :mod:`optimlib.optim.galore.projection`.  The inner rules add: ``smmf`` one all-reduce of
SMMF's ``2 cols`` column sums (plus an exchange of one matrix-view row when a rank's piece of the
low-rank moments starts mid-row); ``adamp`` one 5-number all-gather (the channel-view maximum and
the layer-view sums) and the exchange of one weight row.
Every rank must step the same parameters in the same order.

Layer-wise stepping (optimizer in backward, gradients freed as they are used, one step per
gradient-accumulation window, one LR clock): ``optimizer.layerwise()``
(:class:`optimlib.optim.layerwise.LayerwiseStepper`); one process and FSDP2.

The package: :mod:`~optimlib.optim.galore.bases` (basis math), :mod:`~optimlib.optim.galore.projection`
(the projector), :mod:`~optimlib.optim.galore.moments` (moment stores), :mod:`~optimlib.optim.galore.rules`
(inner rules, the projected step) and :mod:`~optimlib.optim.galore.optimizer` (the class).  GaLore's
successors, each a :class:`~optimlib.optim.galore.family.GaLoreMember` with its own rule or projector:
:mod:`~optimlib.optim.galore.fira` (``fira_adamw``), :mod:`~optimlib.optim.galore.apollo`
(``apollo_adamw``, ``apollo_mini``), :mod:`~optimlib.optim.galore.coap` (``coap_adamw``) and
:mod:`~optimlib.optim.galore.q_galore` (``q_galore_adamw``).

State (per parameter; tensors and plain ints only, so ``torch.load(weights_only=True)`` reads a
checkpoint): ``step``, ``moment_step``, ``seed``, ``rank``, ``refreshes``, the basis (``basis``,
``indices`` or ``basis_seed``), and ``exp_avg``/``exp_avg_sq`` (or their ``_codes``/``_absmax``
when quantized; the second moment is then stored as its square root), or with ``inner="smmf"``
SMMF's ``exp_avg_row``/``exp_avg_col``/``exp_avg_sq_row``/``exp_avg_sq_col``/``exp_avg_sign``.
Parameters outside the low-rank groups keep the inner optimizer's own state (AdamW/AdamP
moments, SMMF factors) with an int ``step``.  Loading a state dict keeps every tensor's saved
dtype (torch would cast codes, indices, sign bits and float32 factors to the parameter's dtype).
"""

from optimlib.optim.galore.optimizer import LOWRANK_KEYS, GaLoreAdamW, is_lowrank_group
from optimlib.optim.galore.projection import ProjectionConfig, Projector
from optimlib.optim.galore.rules import INNER_RULES, InnerRule, galore_adamw_dense_, galore_lowrank_

__all__ = ["GaLoreAdamW", "LOWRANK_KEYS", "is_lowrank_group", "ProjectionConfig", "Projector", "INNER_RULES",
           "InnerRule", "galore_adamw_dense_", "galore_lowrank_"]

from optimlib.optim.galore.apollo import ApolloAdamW  # noqa: E402  (registers "apollo_adamw", "apollo_mini")
from optimlib.optim.galore.coap import COAPAdamW  # noqa: E402  (registers "coap_adamw")
from optimlib.optim.galore.fira import FiraAdamW  # noqa: E402  (registers "fira_adamw")
from optimlib.optim.galore.q_galore import QGaLoreAdamW  # noqa: E402  (registers "q_galore_adamw")

__all__ += ["ApolloAdamW", "COAPAdamW", "FiraAdamW", "QGaLoreAdamW"]
