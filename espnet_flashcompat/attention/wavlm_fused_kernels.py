"""The Triton kernels of ``wavlm_fused`` (which says what they compute, launches them and differentiates): WavLM's
gated relative-position attention forward (``attention_forward``) and backward (``backward_kv``: k, v and the
table; ``backward_q``: q and the gate), and the dropout mask they share (``dropout_keep``, drawn again in each
kernel, or drawn once by the forward and stored a bit per probability: ``pack_keep``, ``stored_keep``;
``write_keep_mask`` writes it out, for tests).

Scores run in base 2 (``exp2``): the table and the key bias come multiplied by log2(e), the log-sum-exp is stored so.
q, k, v, dO and the gradients are (batch, head, time, head_dim) views with strides given per tensor (the head
dimension contiguous); the gate and the log-sum-exp (batch x head, time); the table at offset ``j - i`` from its row
start, padded so that whole tiles read it without bounds checks.
"""

try:  # Triton comes with torch's CUDA wheels; without it ``wavlm_fused.available()`` says why
    import triton
    import triton.language as tl
    MISSING = None
except Exception as exc:  # noqa: BLE001 - any import failure means: not available
    triton = tl = None
    MISSING = f"{type(exc).__name__}: {exc}"

if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)
    PHILOX_ROUNDS = tl.constexpr(10)

    @triton.jit
    def dropout_keep(seed, bh, rows, start, T, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """(BLOCK_M, BLOCK_N): whether dropout keeps the probabilities of queries ``rows`` and keys ``start`` ..
        ``start + BLOCK_N - 1`` (``start`` a multiple of 8) of batch x head ``bh``. One Philox call gives 4 x 32
        random bits: 8 keys' 16 bits each, kept where they reach ``threshold``."""
        calls = start // 8 + tl.arange(0, BLOCK_N // 8)
        counter = (bh.to(tl.int64) * T + rows[:, None]) * ((T + 7) // 8) + calls[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, counter, PHILOX_ROUNDS)
        lo = tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16))
        hi = tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16))
        bits = tl.reshape(tl.join(lo, hi), (BLOCK_M, BLOCK_N))  # key 8 c + j <- the j-th 16 bits of call c
        return bits >= threshold

    @triton.jit
    def pack_keep(keep, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """(BLOCK_M, BLOCK_N // 8) bytes: bit j of byte c says whether key 8 c + j is kept."""
        bits = tl.reshape(keep.to(tl.int32), (BLOCK_M, BLOCK_N // 8, 8)) << tl.arange(0, 8)[None, None, :]
        return tl.sum(bits, 2).to(tl.uint8)

    @triton.jit
    def stored_keep(MASK, bh, rows, start, T, row_bytes, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """``dropout_keep`` read back from the bytes the forward stored (``pack_keep``); rows past T: none kept."""
        cols = start // 8 + tl.arange(0, BLOCK_N // 8)
        packed = tl.load(MASK + (bh.to(tl.int64) * T + rows[:, None]) * row_bytes + cols[None, :],
                         mask=rows[:, None] < T, other=0)
        bits = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
        return tl.reshape(bits, (BLOCK_M, BLOCK_N)) != 0

    @triton.jit
    def attention_forward(Q, K, V, G, R, KB, END, O, LSE, SEED, MASK,
                          sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
                          sg_b, sg_h, sr_h, skb_b,
                          H, T, sm_scale, threshold, rescale, row_bytes,
                          HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr,
                          STORE_MASK: tl.constexpr):
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_D)
        row_ok = rows < T
        q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_t + d[None, :], mask=row_ok[:, None], other=0.0)
        g = tl.load(G + b * sg_b + h * sg_h + rows, mask=row_ok, other=0.0).to(tl.float32)
        qk_scale = sm_scale * LOG2E  # scores in base 2 (the table and key bias come scaled so): exp2 is the fast one
        seed = tl.load(SEED)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
        for start in range(0, tl.load(END + b), BLOCK_N):  # key blocks past the last unpadded key add nothing
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < T
            kt = tl.load(K + b * sk_b + h * sk_h + cols[None, :] * sk_t + d[:, None], mask=col_ok[None, :], other=0.0)
            r = tl.load(R + h * sr_h + cols[None, :] - rows[:, None])  # the table is padded: no bounds to check
            kb = tl.load(KB + b * skb_b + cols, mask=col_ok, other=float("-inf"))
            s = tl.dot(q, kt) * qk_scale + g[:, None] * r + kb[None, :]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:
                keep = dropout_keep(seed, bh, rows, start, T, threshold, BLOCK_M, BLOCK_N)
                p = tl.where(keep, p * rescale, 0.0)
                if STORE_MASK:  # for the backward, which then reads it instead of drawing it again
                    tl.store(MASK + (bh.to(tl.int64) * T + rows[:, None]) * row_bytes + start // 8
                             + tl.arange(0, BLOCK_N // 8)[None, :], pack_keep(keep, BLOCK_M, BLOCK_N),
                             mask=row_ok[:, None])
            v = tl.load(V + b * sv_b + h * sv_h + cols[:, None] * sv_t + d[None, :], mask=col_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        l_use = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_use[:, None]
        tl.store(O + b * so_b + h * so_h + rows[:, None] * so_t + d[None, :], o.to(O.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(LSE + bh * T + rows, tl.where(m_i == float("-inf"), 0.0, m_i) + tl.math.log2(l_use), mask=row_ok)

    @triton.jit
    def backward_kv(Q, K, V, G, R, KB, END, DO, LSE, DELTA, SEED, MASK, DK, DV, DREL,
                    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sg_b, sg_h, sr_h, skb_b, sdrel_h,
                    H, T, sm_scale, threshold, rescale, row_bytes, flat_below, flat_above,
                    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr,
                    E: tl.constexpr, STORED_MASK: tl.constexpr, ROTATE: tl.constexpr):
        """A block of keys: their k and v gradients, and the table's along the diagonals the block meets. q, k, v, dO
        and the gradients share one layout. Rows past the end (time) have q = dO = gate = 0 and an infinite
        log-sum-exp: they add nothing. The table's gradient goes to row h of DREL. Distances j - i at or
        below ``flat_below``, and at or above ``flat_above``, read one table entry each (WavLM's buckets end so): a
        tile all of whose distances lie there adds its whole sum at one distance of it, the tile's j - i = 0 line.
        The diagonal sums of other tiles: ROTATE turns each key row n of the tile by n (BLOCK_N <= BLOCK_M), so
        that column c holds diagonal j - i = first - start - c above the wrap and that + BLOCK_M below it; else the
        tile is sheared into E columns, one per diagonal."""
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        first = tl.program_id(0) * BLOCK_N
        cols = first + tl.arange(0, BLOCK_N)  # keys, the rows of every tile here
        d = tl.arange(0, HEAD_D)
        col_ok = cols < T
        kb = tl.load(KB + b * skb_b + cols, mask=col_ok, other=float("-inf"))
        k = tl.load(K + b * sk_b + h * sk_h + cols[:, None] * sk_t + d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + b * sv_b + h * sv_h + cols[:, None] * sv_t + d[None, :], mask=col_ok[:, None], other=0.0)
        qk_scale = sm_scale * LOG2E
        seed = tl.load(SEED)
        dk = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
        # the tile's diagonals: e = n - m + BLOCK_M - 1 for key n and query m of the tile; the query on diagonal e
        # of key row n is m = n + BLOCK_M - 1 - e; E: BLOCK_M + BLOCK_N - 1 diagonals, rounded up to a power of two
        e = tl.arange(0, E)
        n = tl.arange(0, BLOCK_N)
        m_of = n[:, None] + BLOCK_M - 1 - e[None, :]
        on_tile = (m_of >= 0) & (m_of < BLOCK_M)
        m_of = tl.where(on_tile, m_of, 0)
        c = tl.arange(0, BLOCK_M)
        turned = n[:, None] + c[None, :]  # the query of key row n in column c, before the wrap
        if ROTATE:
            tl.static_assert(BLOCK_N <= BLOCK_M)
        above_wrap = turned < BLOCK_M
        turned = tl.where(above_wrap, turned, turned - BLOCK_M)
        for start in range(0, tl.where(first < tl.load(END + b), T, 0), BLOCK_M):  # padded keys: gradients 0
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < T
            qt = tl.load(Q + b * sq_b + h * sq_h + rows[None, :] * sq_t + d[:, None], mask=row_ok[None, :], other=0.0)
            dot_ = tl.load(DO + b * sq_b + h * sq_h + rows[None, :] * sq_t + d[:, None], mask=row_ok[None, :],
                           other=0.0)
            g = tl.load(G + b * sg_b + h * sg_h + rows, mask=row_ok, other=0.0).to(tl.float32)
            lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + bh * T + rows, mask=row_ok, other=0.0)
            r = tl.load(R + h * sr_h + cols[:, None] - rows[None, :])
            st = tl.dot(k, qt) * qk_scale + g[None, :] * r + kb[:, None]
            pt = tl.math.exp2(st - lse[None, :])
            dpt = tl.dot(v, dot_)
            if DROPOUT:
                if STORED_MASK:
                    keep = tl.trans(stored_keep(MASK, bh, rows, first, T, row_bytes, BLOCK_M, BLOCK_N))
                else:
                    keep = tl.trans(dropout_keep(seed, bh, rows, first, T, threshold, BLOCK_M, BLOCK_N))
                dv += tl.dot(tl.where(keep, pt * rescale, 0.0).to(v.dtype), tl.trans(dot_))
                dpt = tl.where(keep, dpt * rescale, 0.0)
            else:
                dv += tl.dot(pt.to(v.dtype), tl.trans(dot_))
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(k.dtype), tl.trans(qt))
            w = dst * g[None, :]  # the gate-weighted bias gradient, (key, query)
            drel = DREL + h * sdrel_h + T - 1  # distance 0
            if (first - start - (BLOCK_M - 1) >= flat_above) | (first - start + BLOCK_N - 1 <= flat_below):
                tl.atomic_add(drel + first - start, tl.sum(w), sem="relaxed")
            elif ROTATE:
                rotated = tl.gather(w, turned, 1)
                distance = first - start - c
                tl.atomic_add(drel + distance, tl.sum(tl.where(above_wrap, rotated, 0.0), 0),
                              mask=distance > -T, sem="relaxed")
                distance += BLOCK_M
                tl.atomic_add(drel + distance, tl.sum(tl.where(above_wrap, 0.0, rotated), 0),
                              mask=(c > 0) & (distance < T), sem="relaxed")
            else:
                diagonals = tl.sum(tl.where(on_tile, tl.gather(w, m_of, 1), 0.0), 0)  # sheared: a diagonal a column
                distance = first - start + e - (BLOCK_M - 1)  # j - i on diagonal e
                tl.atomic_add(drel + distance, diagonals,
                              mask=(distance > -T) & (distance < T) & (e < BLOCK_M + BLOCK_N - 1), sem="relaxed")
        tl.store(DK + b * sk_b + h * sk_h + cols[:, None] * sk_t + d[None, :], (dk * sm_scale).to(k.dtype),
                 mask=col_ok[:, None])
        tl.store(DV + b * sv_b + h * sv_h + cols[:, None] * sv_t + d[None, :], dv.to(v.dtype), mask=col_ok[:, None])

    @triton.jit
    def backward_q(Q, K, V, G, R, KB, END, DO, LSE, DELTA, SEED, MASK, DQ, DG,
                   sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sg_b, sg_h, sr_h, skb_b,
                   H, T, sm_scale, threshold, rescale, row_bytes,
                   HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr,
                   STORED_MASK: tl.constexpr):
        """A block of queries: their q gradient and the gate's (dG: float32, the gate's strides)."""
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_D)
        row_ok = rows < T
        q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_t + d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + b * sq_b + h * sq_h + rows[:, None] * sq_t + d[None, :], mask=row_ok[:, None], other=0.0)
        g = tl.load(G + b * sg_b + h * sg_h + rows, mask=row_ok, other=0.0).to(tl.float32)
        lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + bh * T + rows, mask=row_ok, other=0.0)
        qk_scale = sm_scale * LOG2E
        seed = tl.load(SEED)
        dq = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
        dg = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, tl.load(END + b), BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < T
            kt = tl.load(K + b * sk_b + h * sk_h + cols[None, :] * sk_t + d[:, None], mask=col_ok[None, :], other=0.0)
            vt = tl.load(V + b * sv_b + h * sv_h + cols[None, :] * sv_t + d[:, None], mask=col_ok[None, :], other=0.0)
            r = tl.load(R + h * sr_h + cols[None, :] - rows[:, None])
            kb = tl.load(KB + b * skb_b + cols, mask=col_ok, other=float("-inf"))
            p = tl.math.exp2(tl.dot(q, kt) * qk_scale + g[:, None] * r + kb[None, :] - lse[:, None])
            dp = tl.dot(do, vt)
            if DROPOUT:
                if STORED_MASK:
                    keep = stored_keep(MASK, bh, rows, start, T, row_bytes, BLOCK_M, BLOCK_N)
                else:
                    keep = dropout_keep(seed, bh, rows, start, T, threshold, BLOCK_M, BLOCK_N)
                dp = tl.where(keep, dp * rescale, 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(q.dtype), tl.trans(kt))
            dg += tl.sum(ds * r, 1)
        tl.store(DQ + b * sq_b + h * sq_h + rows[:, None] * sq_t + d[None, :], (dq * sm_scale).to(q.dtype),
                 mask=row_ok[:, None])
        tl.store(DG + b * sg_b + h * sg_h + rows, dg / LOG2E, mask=row_ok)  # the table came scaled by log2(e)

    @triton.jit
    def write_keep_mask(SEED, OUT, T, threshold, BLOCK: tl.constexpr):
        bh = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(SEED)
        for start in range(0, T, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            keep = dropout_keep(seed, bh, rows, start, T, threshold, BLOCK, BLOCK)
            tl.store(OUT + (bh.to(tl.int64) * T + rows[:, None]) * T + cols[None, :], keep.to(tl.int8),
                     mask=(rows[:, None] < T) & (cols[None, :] < T))


