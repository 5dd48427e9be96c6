"""Testing (§3.2): dense, multi-crop and multi-scale evaluation, fusion, top-1/top-5 error.

- `posteriors`: run a model over a split in each evaluation mode (torch);
- `results`: the posteriors file format and fusion (NumPy only, for `vgg fuse` and `vgg report`);
- `metrics`: top-1/top-5 error; `views`: the dense and multi-crop views of an image at a test scale Q.
"""
