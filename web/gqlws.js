// A small client for the graphql-transport-ws protocol (the one graphql-ws
// speaks): connection_init / connection_ack, subscribe / next / error /
// complete, ping / pong. Authentication is the session cookie, which the
// browser sends on the same-origin upgrade.
//
// The socket reconnects with capped exponential backoff and re-subscribes
// every live operation, asking each for fresh variables, so callers can resume
// from the last cursor they saw (no gap, no duplicate).

const PROTOCOL = "graphql-transport-ws";

export class GraphQLWsClient {
  /**
   * @param {string} url ws:// or wss:// URL of /graphql
   * @param {{onStatus?: (status: string) => void, connectionParams?: object}} [opts]
   */
  constructor(url, opts = {}) {
    this.url = url;
    this.onStatus = opts.onStatus || (() => {});
    this.connectionParams = opts.connectionParams || {};
    this.ops = new Map(); // id -> {payload(), sink, active}
    this.nextId = 1;
    this.ws = null;
    this.acked = false;
    this.retries = 0;
    this.closed = false;
    this.reconnectTimer = null;
    this.ackTimer = null;
  }

  /**
   * Starts an operation. `payload` is a function returning
   * {query, variables}; it is called again on every (re)subscribe.
   * Returns a function that stops the operation.
   */
  subscribe(payload, sink) {
    const id = String(this.nextId++);
    this.ops.set(id, { payload, sink });
    this.ensureSocket();
    if (this.acked) this.sendSubscribe(id);
    return () => {
      if (!this.ops.delete(id)) return;
      if (this.acked) this.send({ id, type: "complete" });
    };
  }

  close() {
    this.closed = true;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.ackTimer);
    this.ops.clear();
    if (this.ws) this.ws.close(1000, "bye");
  }

  send(msg) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(msg));
  }

  sendSubscribe(id) {
    const op = this.ops.get(id);
    if (op) this.send({ id, type: "subscribe", payload: op.payload() });
  }

  ensureSocket() {
    if (this.closed || this.ws) return;
    this.onStatus(this.retries ? "reconnecting" : "connecting");
    const ws = new WebSocket(this.url, PROTOCOL);
    this.ws = ws;
    this.acked = false;
    ws.onopen = () => {
      this.send({ type: "connection_init", payload: this.connectionParams });
      // The protocol gives the server a deadline for the ack; apply one too.
      this.ackTimer = setTimeout(() => ws.close(4408, "ack timeout"), 10000);
    };
    ws.onmessage = (ev) => this.onMessage(ev.data);
    ws.onclose = (ev) => this.onClose(ws, ev);
    ws.onerror = () => {
      /* onclose follows and handles it */
    };
  }

  onMessage(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    switch (msg.type) {
      case "connection_ack":
        clearTimeout(this.ackTimer);
        this.acked = true;
        this.retries = 0;
        this.onStatus("live");
        for (const id of this.ops.keys()) this.sendSubscribe(id);
        break;
      case "ping":
        this.send({ type: "pong" });
        break;
      case "next": {
        const op = this.ops.get(msg.id);
        if (op) op.sink.next(msg.payload);
        break;
      }
      case "error": {
        const op = this.ops.get(msg.id);
        if (op) {
          this.ops.delete(msg.id);
          op.sink.error(msg.payload);
        }
        break;
      }
      case "complete": {
        const op = this.ops.get(msg.id);
        if (op) {
          this.ops.delete(msg.id);
          if (op.sink.complete) op.sink.complete();
        }
        break;
      }
      default:
        break;
    }
  }

  onClose(ws, ev) {
    if (ws !== this.ws) return;
    clearTimeout(this.ackTimer);
    this.ws = null;
    this.acked = false;
    if (this.closed) return;
    // 4401/4403: not allowed; retrying would loop forever.
    if (ev.code === 4401 || ev.code === 4403) {
      this.onStatus("unauthorised");
      for (const op of this.ops.values()) op.sink.error([{ message: ev.reason || "unauthorised" }]);
      this.ops.clear();
      return;
    }
    if (this.ops.size === 0) {
      this.onStatus("idle");
      return;
    }
    this.retries += 1;
    const delay = Math.min(30000, 500 * 2 ** Math.min(this.retries, 6)) * (0.5 + Math.random() / 2);
    this.onStatus("reconnecting");
    this.reconnectTimer = setTimeout(() => this.ensureSocket(), delay);
  }
}
