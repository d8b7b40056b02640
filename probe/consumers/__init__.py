"""Tap consumers that more than one part of the library uses (the map collector of guidance and the studies). A
consumer that belongs to one feature lives with it: the recorder with the recording's plan (:mod:`probe.record`), the
injector with editing and the overlap shift with the intervention (:mod:`probe.steer`)."""
