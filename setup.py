"""Maps the fixed top-level folders onto the `lsrt.*` import package.

Each folder installs as `lsrt.<folder>`; every subpackage below it is discovered here so that a
new subpackage can never be silently missing from the wheel (tests/unit/test_packaging.py builds
the wheel and checks).
"""

from setuptools import find_packages, setup

FOLDERS = ("runtime", "kernels", "sessions", "clients", "proto")

package_dir: dict[str, str] = {}
packages: list[str] = []
for folder in FOLDERS:
    package_dir[f"lsrt.{folder}"] = folder
    packages.append(f"lsrt.{folder}")
    for sub in find_packages(folder):
        packages.append(f"lsrt.{folder}.{sub}")
        package_dir[f"lsrt.{folder}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir, package_data={"lsrt.proto": ["*.proto", "*.pyi"],
                    # shipped LongSpec drafts (runtime/drafts/<target>/): weights + config
                    "lsrt.runtime": ["drafts/*/*.json", "drafts/*/*.safetensors"]})
