"""Build hook: compiles the K-quant group searches (quant/_kqnative.c). Metadata is in pyproject.toml.

The extension is optional: without a C compiler the package still installs and the encoders
use their numpy reference (same bytes, ~10x slower). The flags keep C's float32 semantics
(no FMA contraction, no fast-math), which the byte-identical output depends on.
"""
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            flags = ["/O2", "/fp:precise"]
        else:
            flags = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-fvisibility=hidden"]
        for ext in self.extensions:
            ext.extra_compile_args = flags
        super().build_extensions()


setup(
    ext_modules=[Extension("edgeinfer.quant._kqnative", ["quant/_kqnative.c"], optional=True)],
    cmdclass={"build_ext": BuildExt},
)
