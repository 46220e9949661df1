"""OneTouch Ultra 2 simulator: answers ``DC1 CR <command> CR`` like the real meter (reference A.5).

Answers every copy of a repeated command; stays silent on unknown commands; replies the single
byte ``00`` to everything while "switched on". ``DMZ`` (erase) really erases the simulated memory,
so a driver that ever sends it fails the round-trip tests.
"""

from __future__ import annotations

from typing import ClassVar

from drivers import onetouch_ultra2 as codec
from drivers.simulators.base import Simulator

VERSION = "P02.00.00 01/18/08"
CMD_ERASE = b"DMZ"
CMD_ID = b"DMID"
MAX_COMMAND = 64


class Ultra2Simulator(Simulator):
    PROTOCOL: ClassVar[str] = codec.PROTOCOL
    DEFAULT_SERIAL: ClassVar[str] = "HAXGR4PV"

    def setup(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        for byte in data:
            if byte in (codec.CR[0], codec.LF[0]):
                command = bytes(self._buffer).replace(codec.DC1, b"").strip()
                self._buffer.clear()
                if command:
                    self.command(command)
            else:
                self._buffer.append(byte)
                del self._buffer[:-MAX_COMMAND]

    def _line(self, payload: str) -> None:
        self.send(self._unit(payload.encode("ascii")))

    def _unit(self, payload: bytes) -> bytes:
        line = codec.encode_line(payload)
        if self.mangler.bad_checksum():
            wrong = (codec.checksum(payload) + 1) & 0xFFFF
            line = payload + b" %04X" % wrong + codec.CRLF
        return self.mangler.mangle(line)

    def command(self, command: bytes) -> None:
        self.commands_seen.append(command)
        self.reply_delay()
        if self.faults.switched_on:
            self.send(codec.NOT_READY)
            return
        if command == codec.CMD_VERSION:
            self._line("?" + VERSION)
        elif command == codec.CMD_SERIAL:
            self._line(f'@ "{self.serial}"')
        elif command == CMD_ID:
            self._line('ID "673451"')
        elif command == codec.CMD_CLOCK:
            self._line("F " + codec.format_time(self.meter_now().replace(microsecond=0)))
        elif command == codec.CMD_DUMP:
            self._line(f'P {len(self.records):03d},"{self.serial}","MG/DL "')
            for reading in self.records:
                self.before_record()
                line = codec.encode_record(reading)
                self.send(self._unit(line[: line.rindex(b" ")]))
                self.records_sent += 1
        elif command == CMD_ERASE:
            self.records.clear()
            self._line("Z")
