// Subtitles from timed words, cue for cue what `mlx-voxtral transcribe --format srt|vtt`
// writes for the same words (mlx_voxtral.timestamps.segments_from_words, mlx_voxtral.writers).

// Python's str.split() whitespace (JavaScript's \s differs: it lacks \x1c-\x1f and \x85 and
// has \ufeff), so that cue text is split as the server's writer splits it.
const PY_SPACE = /[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/;

export const SEGMENT_PAUSE = 1.0;
export const SEGMENT_MAX_SECONDS = 12.0;
export const SEGMENT_MAX_WORDS = 40;

/** Words ({text, start, end}, seconds) grouped into segments at pauses and sentence ends. */
export function segmentsFromWords(words) {
  const segments = [];
  let current = [];
  for (const word of words) {
    if (current.length) {
      const prev = current[current.length - 1];
      if (word.start - prev.end > SEGMENT_PAUSE || ".?!".includes(prev.text.slice(-1))
          || word.end - current[0].start > SEGMENT_MAX_SECONDS || current.length >= SEGMENT_MAX_WORDS) {
        segments.push(segment(current));
        current = [];
      }
    }
    current.push(word);
  }
  if (current.length) segments.push(segment(current));
  return segments;
}

function segment(words) {
  return { text: words.map((w) => w.text).join(" "), start: words[0].start, end: words[words.length - 1].end };
}

/** HH:MM:SS.mmm (marker "," for SRT). */
export function timestamp(seconds, marker = ".") {
  let ms = Math.max(0, Math.round(seconds * 1000));
  const hours = Math.floor(ms / 3600000);
  ms -= hours * 3600000;
  const minutes = Math.floor(ms / 60000);
  ms -= minutes * 60000;
  const secs = Math.floor(ms / 1000);
  ms -= secs * 1000;
  const pad = (n, width = 2) => String(n).padStart(width, "0");
  return `${pad(hours)}:${pad(minutes)}:${pad(secs)}${marker}${pad(ms, 3)}`;
}

/** Segment text as one safe cue line: no blank line, no "-->". */
export function cueText(text) {
  return text.split(PY_SPACE).filter(Boolean).join(" ").replaceAll("-->", "->");
}

export function toSRT(segments) {
  return segments.map((s, i) =>
    `${i + 1}\n${timestamp(s.start, ",")} --> ${timestamp(s.end, ",")}\n${cueText(s.text)}\n`).join("\n");
}

export function toVTT(segments) {
  return "WEBVTT\n\n" + segments.map((s) => `${timestamp(s.start)} --> ${timestamp(s.end)}\n${cueText(s.text)}\n`).join("\n");
}
