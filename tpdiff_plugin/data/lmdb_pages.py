"""A structural check of an LMDB ``data.mdb`` before lmdb maps it (used by ``image_checks.check_lmdb_complete``).

LMDB (liblmdb 0.9, 64-bit layout) keeps a B+tree in pages of ``psize`` bytes: pages 0 and 1 are meta pages (the
one with the larger transaction id is current), the others branch, leaf and overflow pages. lmdb reads them
through a memory map and trusts them: a page size of 0 kills the process with SIGFPE when the file is opened, a
node offset or page number past the end of the file with SIGBUS or SIGSEGV, with no message at all. These
functions read the same fields with plain file reads and name the first one lmdb could not use safely. They walk
the pages that listing the keys reads (the main database's branch and leaf pages) and only the 16-byte header of
each value's overflow pages, so the cost is that of ``lmdb_keys``.
"""
import struct

P_INVALID = 2 ** 64 - 1  # an empty tree's root
P_BRANCH, P_LEAF, P_OVERFLOW, P_META, P_LEAF2, P_SUBP = 0x01, 0x02, 0x04, 0x08, 0x20, 0x40
F_BIGDATA = 0x01  # a leaf node whose value lives in overflow pages
HEADER, NODE = 16, 8  # page header and node header sizes
_META_SIZE = 152


def read_header(data, size):
    """``(psize, last_pg, root)`` of the current meta page of ``data`` (a file of ``size`` bytes), or a reason
    (str) why its meta pages are not valid."""
    with open(data, 'rb') as f:
        head = f.read(_META_SIZE)
        if len(head) < _META_SIZE:
            return 'too short for an LMDB header'
        psize = struct.unpack_from('=I', head, 40)[0]  # mm_dbs[FREE_DBI].md_pad holds the page size
        if psize & (psize - 1) or not 512 <= psize <= 65536:
            return f'its header has an invalid page size ({psize})'
        if size < 2 * psize:
            return f'it is shorter than its two header pages of {psize} bytes (truncated)'
        f.seek(psize)
        metas = [head, f.read(_META_SIZE)]
    best = None
    for i, page in enumerate(metas):
        flags = struct.unpack_from('=H', page, 10)[0]
        magic, version, page_size = struct.unpack_from('=II', page, 16) + struct.unpack_from('=I', page, 40)
        roots = [struct.unpack_from('=Q', page, offset)[0] for offset in (80, 128)]  # free DB, main DB
        last_pg, txnid = struct.unpack_from('=QQ', page, 136)
        if not flags & P_META or magic != 0xBEEFC0DE or version != 1 or page_size != psize:
            return f'meta page {i} is not an LMDB meta page (corrupt, or not an LMDB file)'
        if any(root != P_INVALID and not 2 <= root <= last_pg for root in roots):
            return f'meta page {i} names a root page outside the file\'s {last_pg + 1} pages (corrupt)'
        if best is None or txnid > best[3]:
            best = (psize, last_pg, roots[1], txnid)
    return best[:3]


def _leaf_value_problem(f, page, off, ksize, dsize, flags, psize, last_pg):
    """Why a leaf node's value could not be read safely, or None."""
    start = off + NODE + ksize
    if not flags & F_BIGDATA:
        return None if start + dsize <= psize else 'a value runs past its page'
    if start + 8 > psize:
        return 'an overflow reference runs past its page'
    first = struct.unpack_from('=Q', page, start)[0]
    if not 2 <= first <= last_pg:
        return f'a value points to page {first}, outside the file'
    f.seek(first * psize)
    head = f.read(HEADER)
    if len(head) < HEADER:
        return f'overflow page {first} is past the end of the file'
    stored, pflags, count = struct.unpack_from('=Q2xHI', head)
    if stored != first or not pflags & P_OVERFLOW or count < 1 or first + count - 1 > last_pg \
            or dsize > count * psize - HEADER:
        return f'overflow page {first} does not hold the value its leaf names'
    return None


def tree_problem(data, psize, last_pg, root):
    """Walk the main database's tree of ``data`` from ``root``: a reason (str) naming the first page lmdb could
    not read safely, or None."""
    if root == P_INVALID:
        return None
    seen, stack = set(), [root]
    with open(data, 'rb') as f:
        while stack:
            pgno = stack.pop()
            if not 2 <= pgno <= last_pg or pgno in seen:
                return f'the tree names page {pgno} twice or outside the file\'s {last_pg + 1} pages'
            seen.add(pgno)
            f.seek(pgno * psize)
            page = f.read(psize)
            if len(page) < psize:
                return f'page {pgno} is past the end of the file'
            stored, flags, lower, upper = struct.unpack_from('=Q2xHHH', page)
            if stored != pgno or not flags & (P_BRANCH | P_LEAF) or flags & (P_OVERFLOW | P_META | P_LEAF2 | P_SUBP):
                return f'page {pgno} is not the branch or leaf page the tree names'
            if not HEADER <= lower <= upper <= psize or (lower - HEADER) % 2:
                return f'page {pgno} has impossible bounds'
            for k in range((lower - HEADER) // 2):
                off = struct.unpack_from('=H', page, HEADER + 2 * k)[0]
                if not upper <= off <= psize - NODE:
                    return f'page {pgno} has a node outside the page'
                lo, hi, nflags, ksize = struct.unpack_from('=HHHH', page, off)
                if off + NODE + ksize > psize:
                    return f'page {pgno} has a key running past the page'
                if flags & P_BRANCH:
                    stack.append(lo | hi << 16 | nflags << 32)
                    continue
                problem = _leaf_value_problem(f, page, off, ksize, lo | hi << 16, nflags, psize, last_pg)
                if problem:
                    return f'page {pgno}: {problem}'
    return None
