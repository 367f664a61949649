"""Communication: the Communicator (buffer methods, counters, listeners) and hand-built collectives."""
from minipar.comm.communicator import Communicator
from minipar.comm.records import CallRecord, Request
from minipar.comm.traffic import Traffic

__all__ = ["CallRecord", "Communicator", "Request", "Traffic"]
