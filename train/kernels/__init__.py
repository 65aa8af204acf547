"""Compiled CPU routes (numba) for the loops that torch runs slowly on the CPU.

Each module holds a loop compiled with ``@njit(cache=True, nogil=True)`` and a thin typed
wrapper that checks dtype, shape and layout and raises ``TypeError``/``ValueError`` on a
wrong argument (an unchecked pointer would crash a DataLoader worker instead). Each route
has a torch reference beside its caller (``train.augment``) and tests compare the two.

Compiled code is cached by numba in ``__pycache__`` beside these sources, or, where that
folder is not writable, in the user's own cache folder (``~/.cache/numba`` or
``$NUMBA_CACHE_DIR``); numba loads what it finds there. Both are as trusted as the sources
and the environment themselves: whoever can write them can already change the code. No
shared folder (such as /tmp) is used.
"""
