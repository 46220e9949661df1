"""OneTouch UltraEasy / UltraMini simulator (binary packets, reference section C).

DISC -> DISC|ACK and sequence bits reset. A request whose S bit is the one expected is
answered with an ACK packet and then the reply (S = our send bit); a request with the other
S bit is a retransmission: the previous reply is sent again unchanged. Damaged packets are
ignored (the host times out and retries). Erase (05 1A) and set-clock (05 20 01) are logged
and refused with ``05 15``.
"""

from __future__ import annotations

import struct
from typing import ClassVar

from drivers import onetouch_ultraeasy as codec
from drivers.errors import DriverError
from drivers.simulators.base import Simulator

VERSION = "03.04.00"
REQ_ERASE = b"\x05\x1a"
REQ_SET_CLOCK = b"\x05\x20\x01"
REPLY_REFUSED = b"\x05\x15"


class UltraEasySimulator(Simulator):
    PROTOCOL: ClassVar[str] = codec.PROTOCOL
    DEFAULT_SERIAL: ClassVar[str] = "C2X8ZB6FY"

    def setup(self) -> None:
        self._buffer = bytearray()
        self._expect = 0  # the host S bit we expect
        self._s = 0  # our send bit
        self._last_reply: bytes | None = None

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while True:
            start = self._buffer.find(bytes([codec.STX]))
            if start < 0:
                self._buffer.clear()
                return
            del self._buffer[:start]
            if len(self._buffer) < 2:
                return
            length = self._buffer[1]
            if not codec.PACKET_OVERHEAD <= length <= codec.MAX_PACKET:
                del self._buffer[:1]
                continue
            if len(self._buffer) < length:
                return
            candidate = bytes(self._buffer[:length])
            try:
                packet = codec.decode_packet(candidate)
            except DriverError:
                del self._buffer[:1]  # damaged: resynchronise on the next STX
                continue
            del self._buffer[:length]
            self._packet(packet)

    def _send_packet(self, message: bytes, link: int) -> None:
        packet = codec.encode_packet(message, link)
        if message and self.mangler.bad_checksum():
            packet = packet[:-2] + bytes([packet[-2] ^ 0xFF, packet[-1]])
        self.send(self.mangler.mangle(packet))

    def _packet(self, packet: codec.Packet) -> None:
        if packet.disc:
            self.commands_seen.append(b"DISC")
            if self.faults.switched_on:
                return
            self._expect = self._s = 0
            self._last_reply = None
            self.reply_delay()
            self._send_packet(b"", codec.link_bits(disc=True, ack=True))
            return
        if packet.ack or self.faults.switched_on:
            return
        self.reply_delay()
        if packet.s != self._expect and self._last_reply is not None:
            reply = self._last_reply  # retransmitted request: our reply was lost
        else:
            self.commands_seen.append(packet.message)
            self._expect ^= 1
            reply_message = self._answer(packet.message)
            if reply_message is None:
                return
            reply = codec.encode_packet(reply_message, codec.link_bits(s=self._s, e=self._expect))
            self._s ^= 1
            self._last_reply = reply
        self._send_packet(b"", codec.link_bits(s=self._s, e=self._expect, ack=True))
        message = codec.decode_packet(reply)
        self._send_packet(message.message, message.link)

    def _answer(self, message: bytes) -> bytes | None:
        if message == codec.REQ_VERSION:
            return codec.REPLY_OK + bytes([len(VERSION)]) + VERSION.encode()
        if message == codec.REQ_SERIAL:
            return codec.REPLY_OK + self.serial.encode()
        if message == codec.REQ_CLOCK:
            return codec.REPLY_OK + struct.pack("<I", codec.encode_time(self.meter_now()))
        if message.startswith(codec.REQ_RECORD) and len(message) == 4:
            index = struct.unpack("<H", message[2:])[0]
            if index == codec.COUNT_INDEX:
                return codec.REPLY_COUNT + struct.pack("<H", len(self.records))
            if index < len(self.records):
                self.before_record()
                self.records_sent += 1
                return codec.encode_record(self.records[index])
            return REPLY_REFUSED
        if message.startswith((REQ_ERASE, REQ_SET_CLOCK)):
            return REPLY_REFUSED
        return None
