"""Analysis of attention maps, computed once for every reader: token and subject maps (:mod:`~probe.analysis.maps`,
:mod:`~probe.analysis.subjects`), overlap statistics (:mod:`~probe.analysis.overlap`), linear probes
(:mod:`~probe.analysis.probes`), statistics over prompts (:mod:`~probe.analysis.stats`) and the same over a store
too large for memory (:mod:`~probe.analysis.lazy`)."""
