"""The machinery behind the scripts of a checkout of this project.

It lives in the checkout, beside the files it finds by path (config.yaml, proc_load.py, the model
modules alex_net.py and layers.py, preprocessing/paths.yaml). The scripts import it from their own
folder: the root, or the links preprocessing/alexnet_lib, bench/alexnet_lib and
pretrained/alexnet_lib (-> ../alexnet_lib), so every script runs its own checkout's code; the
paths are taken from this folder with symlinks resolved. An install without a checkout (a wheel,
`pip install .`) has none of those files: importing it stops here, in one line.
"""
import os as _os

_CHECKOUT = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))

if not all(_os.path.isfile(_os.path.join(_CHECKOUT, name))
           for name in ('config.yaml', 'proc_load.py', 'alex_net.py')):
    raise SystemExit(f"error: alexnet_lib in {_CHECKOUT} is not in a checkout of the project (no "
                     "config.yaml, proc_load.py, alex_net.py beside it): install it from a "
                     "checkout with 'pip install -e CHECKOUT' (or 'bash CHECKOUT/setup.sh') and "
                     "run the scripts from the checkout")
