from setuptools import setup

setup(
    cffi_modules=["csrc/build_native.py:ffibuilder"],
    # The cffi module is built against the stable ABI: one wheel for CPython >= 3.10.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
