"""Communication: the Communicator (buffer methods, counters, listeners) and hand-built collectives."""
from minipar.comm.collectives import Traffic
from minipar.comm.communicator import Communicator
from minipar.comm.records import CallRecord, Request

__all__ = ["CallRecord", "Communicator", "Request", "Traffic"]
