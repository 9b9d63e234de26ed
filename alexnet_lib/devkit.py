"""The ImageNet devkit's synsets file, as preprocessing and classify.py read it: the classes'
WNIDs, ids and words from ILSVRC2014_devkit/data/meta_clsloc.mat or
ILSVRC2012_devkit_t12/data/meta.mat (MATLAB structs, read with scipy).

    from alexnet_lib.devkit import read_devkit_synsets
    synsets = read_devkit_synsets('ILSVRC2014_devkit/data/meta_clsloc.mat')
    class_id, words = synsets['n01440764']     # the devkit's id (1..1000) and words
"""
import numpy as np

from alexnet_lib.imagenet import PrepError

# the id field of each devkit's synsets; a struct with neither is read by position (id first,
# WNID second), as the original read it
DEVKIT_ID_FIELDS = ('ILSVRC2014_ID', 'ILSVRC2012_ID')
DEVKIT_EXPECTED = ("expected ILSVRC2014_ID, WNID, words, ... (ILSVRC2014_devkit/data/"
                   "meta_clsloc.mat) or ILSVRC2012_ID, WNID, words, ... (ILSVRC2012_devkit_t12/"
                   "data/meta.mat): point meta_clsloc_mat at one of those")


def _mat_int(value):
    """A struct field's integer, or None. loadmat(squeeze_me=True) gives an int, a numpy
    scalar of any integer type, a float (MATLAB double) or a 1-element array."""
    value = np.asarray(value)
    if value.size != 1 or value.dtype.kind not in 'iuf':
        return None
    number = value.item()
    if isinstance(number, float) and not number.is_integer():
        return None
    return int(number)


def _mat_text(value):
    """A struct field's string ('' for MATLAB's empty char array), or None."""
    if isinstance(value, str):  # numpy str too
        return value
    value = np.asarray(value)
    if value.dtype.kind == 'U' and value.size <= 1:
        return str(value.item()) if value.size else ''
    return None


def read_devkit_synsets(meta_file):
    """{wnid: (id, words)} of the classes of a devkit's synsets file: meta_clsloc.mat of the
    ILSVRC2014 devkit (id field ILSVRC2014_ID) or meta.mat of ILSVRC2012_devkit_t12
    (ILSVRC2012_ID). Both hold 1,860 synsets: the 1,000 classes (num_children 0, ids 1..1000,
    the same classes in both) and 860 internal nodes of the WordNet tree above them (ids
    1001..1860), which are not classes and are left out. The ids are not in WNID order.
    A file that is neither is a PrepError naming the fields it has and those expected."""
    import scipy.io
    try:
        mat = scipy.io.loadmat(meta_file, squeeze_me=True)
    except Exception as e:  # scipy raises ValueError, MatReadError, OSError, ... for a bad file
        raise PrepError(f"cannot read devkit file {meta_file}: {' '.join(str(e).split())}; "
                        f"unpack it again from the devkit, or point meta_clsloc_mat at "
                        f"ILSVRC2014_devkit/data/meta_clsloc.mat or "
                        f"ILSVRC2012_devkit_t12/data/meta.mat") from None
    if 'synsets' not in mat:
        found = ', '.join(k for k in mat if not k.startswith('__')) or 'nothing'
        raise PrepError(f"devkit file {meta_file} has no 'synsets' struct (it holds {found}); "
                        f"{DEVKIT_EXPECTED}")
    synsets = np.atleast_1d(mat['synsets']).ravel()  # squeeze_me makes a 1-synset struct 0-d
    fields = synsets.dtype.names or ()
    if not fields:
        raise PrepError(f"devkit file {meta_file}: its 'synsets' is not a struct (no fields); "
                        f"{DEVKIT_EXPECTED}")

    def mismatch(why):  # the fields found, the fields expected
        return PrepError(f"devkit file {meta_file}: its 'synsets' struct has the fields "
                         f"{', '.join(fields)} ({why}); {DEVKIT_EXPECTED}")

    if len(fields) < 2:
        raise mismatch("not an id and a WNID")
    id_field = next((f for f in DEVKIT_ID_FIELDS if f in fields), fields[0])
    wnid_field = 'WNID' if 'WNID' in fields else fields[1]
    out = {}
    for number, s in enumerate(synsets, 1):
        class_id, wnid = _mat_int(s[id_field]), _mat_text(s[wnid_field])
        if class_id is None:
            raise mismatch(f"'{id_field}' of synset {number} is not an integer id")
        if wnid is None or wnid[:1] != 'n' or not wnid[1:].isdigit():
            raise mismatch(f"'{wnid_field}' of synset {number} is not a WNID like n01440764")
        if 'num_children' in fields:
            n_children = _mat_int(s['num_children'])
            if n_children is None:
                raise mismatch(f"'num_children' of synset {number} is not a number")
            if n_children > 0:
                continue  # an internal node of the WordNet tree, not a class
        words = _mat_text(s['words']) if 'words' in fields else ''
        out[wnid] = (class_id, words or '')
    return out

