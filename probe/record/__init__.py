"""Record attention maps of a generation into an ``xarray.DataTree``.

Schema (see the README): ``/cross/res{N}`` holds ``attn(sample, step, layer, [head], y, x, token)``
and ``/self/res{N}`` holds ``attn(sample, step, layer, [head], y, x, ky, kx)``, float16, only the
conditional half of classifier-free guidance; ``/images`` holds ``image(sample, iy, ix, channel)``.
Reductions (head mean, CFG half, padding tokens) happen on the device; each batch is copied to
the host once, and with ``out=`` written to zarr batch by batch, so memory does not grow with
the number of samples.
"""


from probe.record.config import RecordSettings
from probe.record.plan import (
    BYTES_PER_VALUE,
    KNOWN_SIZES,
    PIXEL_BYTES,
    Plan,
    estimate,
    map_layer_bytes,
    plan,
    qk_layer_bytes,
    qk_size_markdown,
    qk_size_table,
)
from probe.record.recorder import Recorder
from probe.record.run import record
from probe.record.schema import COMPLETE, contradictions, recording_schema_problems
from probe.record.store import (
    MAP_VARIABLES,
    damaged_chunks,
    full_self,
    open_recording,
    save,
    stored_chunks,
    zarr_encoding,
)

__all__ = ["BYTES_PER_VALUE", "COMPLETE", "KNOWN_SIZES", "MAP_VARIABLES", "PIXEL_BYTES", "Plan", "RecordSettings",
           "Recorder", "contradictions", "damaged_chunks", "estimate", "full_self", "map_layer_bytes", "open_recording",
           "plan", "qk_layer_bytes", "qk_size_markdown", "qk_size_table", "record", "recording_schema_problems", "save",
           "stored_chunks", "zarr_encoding"]
