// AudioWorklet: the microphone's samples (at the AudioContext's rate, channels averaged) as
// PCM16 little-endian chunks of `chunkSamples`, posted to the page as ArrayBuffers. A
// "flush" message posts the partial chunk, then {flushed: true}: after it, nothing more.

class PCM16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.size = options.processorOptions.chunkSamples;
    this.fresh();
    this.stopped = false;
    this.port.onmessage = (event) => {
      if (event.data === "flush") {
        this.post();
        this.stopped = true;
        this.port.postMessage({ flushed: true });
      }
    };
  }

  fresh() {
    this.buffer = new ArrayBuffer(this.size * 2);
    this.view = new DataView(this.buffer);
    this.filled = 0;
  }

  post() {
    if (this.filled) {
      const out = this.buffer.slice(0, this.filled * 2);
      this.port.postMessage(out, [out]);
    }
    this.fresh();
  }

  process(inputs) {
    const input = inputs[0];
    if (this.stopped) return false;
    if (!input || !input.length) return true;
    const channels = input.length;
    const n = input[0].length;
    for (let i = 0; i < n; i++) {
      let x = 0;
      for (let c = 0; c < channels; c++) x += input[c][i];
      x /= channels;
      // x * 32768, rounded and clipped: a 16-bit sample read as s / 32768 comes back as s
      let s = Math.round(x * 32768);
      s = s > 32767 ? 32767 : s < -32768 ? -32768 : s;
      this.view.setInt16(this.filled * 2, s, true);
      if (++this.filled === this.size) this.post();
    }
    return true;
  }
}

registerProcessor("pcm16-capture", PCM16Capture);
