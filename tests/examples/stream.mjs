// The upstream document's "Streaming (Node.js)" example, unchanged but for base URL, key
// and the stream flag (the document leaves how streaming is enabled to the request).
const BASE_URL = process.env.BASE_URL;
const AGENT_ID = 'ag_support';
const API_KEY = process.env.API_KEY;

const response = await fetch(`${BASE_URL}/v1/agents/${AGENT_ID}/chat`, {
  method: 'POST',
  headers: {
    'Authorization': `Bearer ${API_KEY}`,
    'Content-Type': 'application/json',
  },
  body: JSON.stringify({
    message: 'Tell me about your products',
    stream: true,
  }),
});

const reader = response.body.getReader();
const decoder = new TextDecoder();

while (true) {
  const { done, value } = await reader.read();
  if (done) break;

  const chunk = decoder.decode(value, { stream: true });
  const lines = chunk.split('\n').filter(l => l.startsWith('data: '));

  for (const line of lines) {
    const event = JSON.parse(line.slice(6));
    if (event.type === 'content') {
      process.stdout.write(event.content);
    }
  }
}
