"""Shared pieces of the fuzz suite (issue 14): example budget, hang guard, the "one clear error" contract.

Budget: ``TPDIFF_FUZZ_EXAMPLES`` examples per test (default 25, so ``tests/fuzz`` stays well under a minute
on one core). Unset, the examples are derandomized (the same inputs every CI run); set, they are random
(a longer search, e.g. ``TPDIFF_FUZZ_EXAMPLES=2000``). No example database is written into the tree.
"""
import contextlib
import faulthandler
import io
import multiprocessing
import os
import signal
import sys
import tempfile
import traceback

import cv2
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from PIL import Image

from tpdiff_plugin.utils.errors import UserError

set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), 'tpdiff-hypothesis'))  # its caches stay out of the tree

EXAMPLES = int(os.environ.get('TPDIFF_FUZZ_EXAMPLES') or 25)
HANG_SECONDS = 20  # one example over this is a hang: a TimeoutError (Python code), or a dump and exit (C code)


def fuzz_settings(scale=1.0):
    """Hypothesis settings for one fuzz test: ``scale`` x the example budget, no deadline (files and IO)."""
    return settings(max_examples=max(1, int(EXAMPLES * scale)), deadline=None, database=None,
                    derandomize='TPDIFF_FUZZ_EXAMPLES' not in os.environ, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


def _alarm(signum, frame):
    raise TimeoutError(f'fuzz example ran over {HANG_SECONDS} s (a hang)')


@contextlib.contextmanager
def hang_guard(seconds=HANG_SECONDS):
    """Fail an example that runs over ``seconds``: SIGALRM raises in Python code; if the interpreter is stuck in
    C code (where no Python handler can run), faulthandler dumps every thread and exits the process at 2x."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(2 * seconds, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        faulthandler.cancel_dump_traceback_later()


def outcome(fn, *args, errors=(UserError,), **kwargs):
    """Call ``fn``: its result, or the message of one of the documented ``errors`` (which must be one non-empty
    line). Any other exception, and a hang, propagates: that is the bug the fuzzer looks for."""
    with hang_guard():
        try:
            return fn(*args, **kwargs), None
        except errors as e:
            message = str(e)
            assert message.strip() and '\n' not in message.strip(), f'not one line: {message!r}'
            return None, message


def _child(conn, fn, args, errors):
    try:
        conn.send(('ok', outcome(fn, *args, errors=errors)[1]))
    except BaseException:  # noqa: BLE001  (sent to the parent, which fails the example with it)
        conn.send(('bug', traceback.format_exc()))


def isolated(fn, *args, errors=(UserError,), timeout=HANG_SECONDS):
    """:func:`outcome` of ``fn(*args)`` in a forked child, for inputs that could crash the interpreter (a
    corrupt memory-mapped LMDB): returns the error message or None; a crash, a hang or any other exception
    fails the example. ``fn``'s result stays in the child."""
    parent, child = multiprocessing.Pipe(duplex=False)
    proc = multiprocessing.get_context('fork').Process(target=_child, args=(child, fn, args, errors))
    proc.start()
    child.close()
    ready, result = parent.poll(timeout), None
    if ready:
        with contextlib.suppress(EOFError):  # the child died without a word: result stays None
            result = parent.recv()
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    assert result is not None, (f'{getattr(fn, "__name__", fn)} hung (over {timeout} s)' if not ready else
                                f'{getattr(fn, "__name__", fn)} crashed the interpreter (exit code {proc.exitcode})')
    kind, payload = result
    assert kind == 'ok', payload
    return payload


# ------------------------------------------------------------------------------------------ image bytes
# (extension, channel counts OpenCV writes for it, 16-bit possible)
FORMATS = [('.png', (1, 3, 4), True), ('.jpg', (1, 3), False), ('.tif', (1, 3, 4), True), ('.bmp', (1, 3), False),
           ('.webp', (3, 4), False), ('.ppm', (3,), True), ('.pgm', (1,), True)]


@st.composite
def image_bytes(draw):
    """A small valid encoded image: PNG/JPEG/TIFF/BMP/WebP/PNM, gray/BGR/BGRA/gray+alpha/palette, 8/16-bit,
    alpha opaque or with transparent pixels."""
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    if draw(st.integers(0, 7)) == 0:  # what OpenCV cannot write: gray+alpha, palette with transparency
        mode = draw(st.sampled_from(['LA', 'P']))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 2) if mode == 'LA' else (h, w), dtype=np.uint8))
        buf = io.BytesIO()
        if mode == 'P':
            img.convert('P').save(buf, 'PNG', transparency=int(rng.integers(0, 256)))
        else:
            img.save(buf, 'PNG')
        return buf.getvalue()
    ext, channel_options, deep = draw(st.sampled_from(FORMATS))
    channels = draw(st.sampled_from(channel_options))
    dtype = np.uint16 if deep and draw(st.booleans()) else np.uint8
    img = rng.integers(0, np.iinfo(dtype).max + 1, (h, w, channels), dtype=dtype)
    if channels == 4 and draw(st.booleans()):
        img[..., 3] = np.iinfo(dtype).max  # fully opaque: accepted; otherwise transparent pixels: refused
    ok, buf = cv2.imencode(ext, img if channels > 1 else img[..., 0])
    assert ok
    return buf.tobytes()


_POSITION = st.one_of(st.integers(0, 63), st.integers(0, 2 ** 20))  # half of the edits in the header
_EDIT = st.one_of(
    st.tuples(st.just('set'), _POSITION, st.binary(min_size=1, max_size=4)),
    st.tuples(st.just('big'), _POSITION, st.sampled_from([b'\xff\xff', b'\x7f\xff\xff\xff', b'\x00\x00', b'\x80'])),
    st.tuples(st.just('insert'), _POSITION, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just('delete'), _POSITION, st.integers(1, 16)),
    st.tuples(st.just('truncate'), _POSITION, st.none()))


def mutate(data, edits):
    """Apply byte edits (positions wrap around the data) to ``data``."""
    data = bytearray(data)
    for op, pos, arg in edits:
        pos = pos % (len(data) + 1)
        if op in ('set', 'big'):
            data[pos:pos + len(arg)] = arg
        elif op == 'insert':
            data[pos:pos] = arg
        elif op == 'delete':
            del data[pos:pos + arg]
        else:
            del data[pos:]
    return bytes(data)


@st.composite
def mutated_bytes(draw, seeds=image_bytes()):
    """Seed bytes with 0-4 edits (truncation, overwrites, header fields set to huge values, inserts, deletes),
    or random bytes, or random bytes behind a real magic number."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=256))
    if kind == 1:
        magic = draw(st.sampled_from([b'\x89PNG\r\n\x1a\n', b'\xff\xd8\xff', b'II*\x00', b'MM\x00*', b'BM',
                                      b'RIFF\x00\x00\x00\x00WEBPVP8 ', b'P5\n', b'P6\n']))
        return magic + draw(st.binary(max_size=256))
    return mutate(draw(seeds), draw(st.lists(_EDIT, max_size=4)))
