// The upstream document's Node.js example, unchanged but for base URL and key
// (taken from the environment so the test can point it at the gateway).
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
    message: 'Hello!',
    session_id: 'sess_001',
  }),
});

const data = await response.json();
console.log(data.response);
