"""Recordings on disk: zarr (appended batch by batch, zstd and crc32c) and netCDF (fletcher32), saved through a
temporary sibling, opened with their schema checked, and their chunks verified."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from probe.record.schema import COMPLETE, contradictions, recording_schema_problems
from probe.writes import recover, replacing

MAP_VARIABLES = ("attn", "q", "k", "keys", "image")


def stored_chunks(dims, shape) -> tuple[int, ...]:
    """A recording's chunks: one per sample, and per step for maps (a viewer moving through steps reads only the
    step it shows)."""
    return tuple(1 if d in ("sample", "step") else n for d, n in zip(dims, shape))


def zarr_encoding(ds: xr.Dataset) -> dict:
    """How a group's maps are stored: :func:`stored_chunks`, zstd, and a CRC-32C checksum in every chunk, so a
    damaged chunk is an error when read instead of wrong numbers."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return {v: {"chunks": stored_chunks(ds[v].dims, ds[v].shape), "compressors": [ZstdCodec(), Crc32cCodec()]}
            for v in MAP_VARIABLES if v in ds.data_vars}


def append_zarr(path: Path, groups: dict[str, xr.Dataset], attrs: dict, first: bool) -> None:
    if first:
        xr.Dataset(attrs=attrs).to_zarr(path, mode="w", consolidated=False)
    for group, ds in groups.items():
        if first:
            ds.to_zarr(path, group=group, mode="a", encoding=zarr_encoding(ds), consolidated=False,
                       write_empty_chunks=True)
        else:
            ds.to_zarr(path, group=group, append_dim="sample", consolidated=False, write_empty_chunks=True)


def write_netcdf(tree: xr.DataTree, path: Path) -> None:
    """netCDF4 through h5netcdf, a Fletcher-32 checksum on every chunk of the maps (HDF5 checks it on each read)."""
    encoding = {node.path: {v: {"fletcher32": True} for v in MAP_VARIABLES if v in node.ds.data_vars}
                for node in tree.subtree if any(v in node.ds.data_vars for v in MAP_VARIABLES)}
    tree.to_netcdf(path, engine="h5netcdf", encoding=encoding)


def save(tree: xr.DataTree, path: str | Path, *, force: bool = False) -> Path:
    """Write a recording to ``.zarr`` or ``.nc`` (netCDF4 through h5netcdf), whole or not at all.

    The new store is written beside ``path`` and swapped in when complete, so a failure or a kill leaves what was
    at ``path`` as it was, and saving a lazily opened recording over its own store works (it is read before the
    swap). ``force=True`` replaces a file or folder at ``path`` that is not a probe recording.
    """
    tree = tree.copy(deep=False)
    tree.attrs = {**tree.attrs, COMPLETE: 1}  # every chunk is written, so a missing one is a damaged store
    with replacing(path, suffixes=(".zarr", ".nc"), force=force, what="recording") as tmp:
        if Path(path).suffix == ".zarr":
            encoding = {node.path: zarr_encoding(node.ds) for node in tree.subtree}
            tree.to_zarr(tmp, mode="w-", consolidated=False, encoding={k: v for k, v in encoding.items() if v},
                         write_empty_chunks=True)
        else:
            write_netcdf(tree, tmp)
    return Path(path)


def full_self(ds: xr.Dataset, reader: str) -> xr.Dataset:
    """A self-attention group that holds every query and every key, or a clear error for a reader that needs that
    (a recording made with ``self_keys`` or ``self_queries`` keeps less)."""
    if "q" in ds.data_vars:
        raise ValueError(f"{reader} needs self-attention maps, and this group holds the q and k they are made of "
                         "(self_store='qk'): make them with probe.analysis.lazy.maps_from_qk(group, kind) first")
    kept = [what for what, flag in (("pooled keys", ds.attrs.get("keys_pooled")),
                                    ("chosen query points", ds.attrs.get("query_points") or "point" in ds.dims))
            if flag]
    if kept:
        raise ValueError(f"{reader} needs full self-attention maps, but this recording kept {' and '.join(kept)} "
                         "(self_keys= / self_queries=); record again without them for this use")
    return ds


def open_recording(path: str | Path, *, verify: bool = False) -> xr.DataTree:
    """Open a recording lazily (dask arrays; nothing is read until used).

    Every chunk the writer made must be there (a deleted chunk would read as NaN maps or a black image); with
    ``verify=True`` every chunk is also read and checked against the checksum the writer stored in it (zarr:
    CRC-32C, netCDF: Fletcher-32), which reads the whole recording once.
    """
    path = Path(path)
    recover(path)
    if not path.exists():
        raise FileNotFoundError(f"no recording at {path}")
    engine = "zarr" if path.suffix == ".zarr" or path.is_dir() else "h5netcdf"
    kwargs = {"consolidated": False} if engine == "zarr" else {}
    try:
        tree = xr.open_datatree(path, engine=engine, chunks={}, **kwargs)
    except Exception as err:  # zarr's GroupNotFoundError, h5py's OSError, a truncated file's ValueError …
        raise ValueError(f"{path} is not a readable recording ({type(err).__name__}: {err}). A recording is "
                         "written beside its path and renamed only when complete, so this one was made "
                         "elsewhere or damaged afterwards: record it again") from err
    if not any(name.startswith(("cross", "self")) for name in tree.children):
        raise ValueError(f"{path} opens but holds no attention groups (cross/…, self/…): it is not a probe "
                         f"recording (its groups: {sorted(tree.children)})")
    foreign = recording_schema_problems(tree)
    if foreign:
        raise ValueError(f"{path} opens but is not a probe recording: {'; '.join(foreign[:5])}")
    problems = contradictions(tree) + damaged_chunks(path, read=verify)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{path} is damaged: {'; '.join(problems[:5])}{more}. It was complete when written, so it "
                         "changed afterwards: restore it from a copy or record it again")
    return tree


def damaged_chunks(path: str | Path, read: bool = False) -> list[str]:
    """The chunks of a written recording that are missing (zarr: every chunk of its maps and images is written, so
    a missing one was deleted), and with ``read=True`` those whose stored checksum does not match."""
    path = Path(path)
    if not path.is_dir():
        return _damaged_netcdf(path) if read else []
    import zarr

    if not zarr.open_group(str(path), mode="r").attrs.get(COMPLETE):
        return []  # older recordings skipped chunks of fill values; a sweep's items are checked by their markers
    found = []
    for group_path, array in _arrays(zarr.open_group(str(path), mode="r")):
        if group_path.rsplit("/", 1)[-1] not in MAP_VARIABLES:
            continue
        grid = [range(-(-n // c)) for n, c in zip(array.shape, array.chunks)]
        for coords in np.ndindex(*[len(g) for g in grid]):
            key = array.metadata.encode_chunk_key(coords)
            if not (path / group_path / key).is_file():
                found.append(f"chunk {group_path}/{key} is missing")
            elif read:
                try:
                    array[tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, array.chunks))]
                except Exception as err:  # zarr's checksum mismatch, a codec's error on a truncated chunk
                    found.append(f"chunk {group_path}/{key} is damaged ({err})")
    return found


def _arrays(group, prefix: str = ""):
    for name, member in group.members():
        import zarr

        if isinstance(member, zarr.Array):
            yield f"{prefix}{name}", member
        else:
            yield from _arrays(member, f"{prefix}{name}/")


def _damaged_netcdf(path: Path) -> list[str]:
    import h5py

    found = []
    with h5py.File(path, "r") as f:
        def check(name, obj):
            if isinstance(obj, h5py.Dataset):
                try:
                    obj[()]
                except OSError as err:  # HDF5's Fletcher-32 mismatch, a truncated file
                    found.append(f"{name} is damaged ({err})")
        f.visititems(check)
    return found
