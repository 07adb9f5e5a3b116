//! Reads WebSocket frame headers (RFC 6455 §5.2) in the bytes a client sends through the proxy,
//! without touching the payload, so data frames can count as activity while pings, pongs and an
//! open but silent socket do not. The bytes themselves pass through unchanged.

/// Incremental: bytes may arrive split anywhere.
#[derive(Debug, Default)]
pub struct FrameScanner {
    header: [u8; 14],
    have: usize,
    payload_left: u64,
}

impl FrameScanner {
    /// Feeds the next client bytes; returns how many data frames (text, binary, continuation)
    /// began in them.
    pub fn feed(&mut self, mut bytes: &[u8]) -> usize {
        let mut data_frames = 0;
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = usize::try_from(self.payload_left).unwrap_or(usize::MAX).min(bytes.len());
                self.payload_left -= skip as u64;
                bytes = &bytes[skip..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            let Some(header_length) = self.header_length() else { continue };
            if self.have < header_length {
                continue;
            }
            let opcode = self.header[0] & 0x0f;
            if matches!(opcode, 0x0..=0x2) {
                data_frames += 1;
            }
            self.payload_left = self.payload_length();
            self.have = 0;
        }
        data_frames
    }

    /// The whole header's length, once its first two bytes are in.
    fn header_length(&self) -> Option<usize> {
        if self.have < 2 {
            return None;
        }
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        Some(2 + extended + mask)
    }

    fn payload_length(&self) -> u64 {
        match self.header[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => u64::from_be_bytes(self.header[2..10].try_into().unwrap_or([0; 8])),
            short => u64::from(short),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn frame(opcode: u8, payload_length: usize) -> Vec<u8> {
        let mut bytes = vec![0x80 | opcode];
        match payload_length {
            0..=125 => bytes.push(0x80 | payload_length as u8),
            126..=65535 => {
                bytes.push(0x80 | 126);
                bytes.extend_from_slice(&(payload_length as u16).to_be_bytes());
            }
            _ => {
                bytes.push(0x80 | 127);
                bytes.extend_from_slice(&(payload_length as u64).to_be_bytes());
            }
        }
        bytes.extend_from_slice(&[1, 2, 3, 4]);
        bytes.extend(std::iter::repeat_n(0x7fu8, payload_length));
        bytes
    }

    #[test]
    fn data_frames_count_control_frames_do_not_in_any_split() {
        let mut stream = Vec::new();
        for (opcode, length) in [(0x9, 4), (0x1, 5), (0xA, 0), (0x2, 300), (0x0, 70_000), (0x8, 2)] {
            stream.extend(frame(opcode, length));
        }
        for chunk in [1, 3, 7, 1000, stream.len()] {
            let mut scanner = FrameScanner::default();
            let counted: usize = stream.chunks(chunk).map(|bytes| scanner.feed(bytes)).sum();
            assert_eq!(counted, 3, "chunks of {chunk}");
        }
        let mut scanner = FrameScanner::default();
        assert_eq!(scanner.feed(&frame(0x9, 0)), 0);
    }
}
