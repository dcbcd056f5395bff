// cim web client: the route's HTTP API, the IM server's WebSocket, cursors
// and the outbox.  No DOM here: app.js shows what this module reports.
//
// The wire is cim's protobuf `Request`, one per WebSocket message, in its
// proto3 JSON form (subprotocol cim.v1.json): camelCase field names, enums
// by name, int64 fields as strings, default values left out.
//
// What survives a reload, in local storage:
//   cim.device              this browser's device id (a session per device)
//   cim.account             {userId, userName, token, deviceKey}: the last
//                           login token (a proof while its session lives)
//                           and this device's device key, the proof of the
//                           next login (a token dies with its session, when
//                           the connection closes or its server dies); the
//                           route answers a new key at each login, and the
//                           one used stops working
//   cim.state.<userId>      per conversation the stream position the server
//                           named (epoch, seq: what is acknowledged and sent
//                           at login) and per epoch tag the highest seq
//                           received (a message (tag, seq) is new iff seq is
//                           above it); and the outbox, sends not yet stored.
// The password is never kept: it is asked for once, by the login form.

export const SUCCESS = "9000";
export const SUBPROTOCOL = "cim.v1.json";
export const PING_INTERVAL = 10_000;
/** Nothing heard for this long (a PING is answered): the connection is dead. */
export const IDLE_TIMEOUT = 25_000;
export const ACK_DELAY = 200;
/** Epoch tags remembered per conversation (as the library's cursor file). */
const MAX_TAGS = 8;
/** Errors of a send that a later try may not get (cim/codes.py): rate
 * limited, a failure, the store failing; any other refuses it for good. */
const TRANSIENT_ERRORS = [6000, 4000, 9200];
const RESEND_DELAY = 2_000;
/** Kick reasons after which the client must not reconnect (cim.message). */
export const FINAL_KICKS = [
  "logged in again elsewhere",
  "logged out: this user logged in on more devices than allowed",
];

/** An answer of the route other than success. */
export class ApiError extends Error {
  constructor(code, message, data) {
    super(message || `error ${code}`);
    this.code = code;
    this.data = data;
  }
}

/** The account kept in local storage (cim.account), or null. */
export function storedAccount(storage = localStorage) {
  try {
    const saved = JSON.parse(storage.getItem("cim.account") || "null");
    if (!saved || !saved.userId) return null;
    return { ...saved, userId: Number(saved.userId) };
  } catch {
    return null;
  }
}

/** The route's HTTP API (same origin), always asking for cim's replies. */
export class Route {
  constructor(base = "") {
    this.base = base;
    this.token = null;
  }

  /** POST `body` to `path` (with `token` as the bearer, if any): @return dataBody. */
  async call(path, body = {}, token = this.token) {
    const headers = { "Content-Type": "application/json", "X-Cim-Extended": "1" };
    if (token) headers.Authorization = `Bearer ${token}`;
    let response;
    try {
      response = await fetch(this.base + path, {
        method: "POST", headers, body: JSON.stringify(body), cache: "no-store",
      });
    } catch (e) {
      throw new ApiError("network", `the route is unreachable (${e.message})`);
    }
    let answer;
    try {
      answer = await response.json();
    } catch {
      throw new ApiError(String(response.status), `the route answered HTTP ${response.status}`);
    }
    if (answer.code !== SUCCESS) throw new ApiError(answer.code, answer.message, answer.dataBody);
    return answer.dataBody;
  }

  async onlineUsers() {
    const response = await fetch(this.base + "/onlineUser", { cache: "no-store" });
    const answer = await response.json();
    if (answer.code !== SUCCESS) throw new ApiError(answer.code, answer.message);
    return answer.dataBody || [];
  }
}

/** A private conversation's id: "p:<lower id>:<higher id>". */
export function pairConversation(a, b) {
  const [low, high] = a < b ? [a, b] : [b, a];
  return `p:${low}:${high}`;
}

/** The other user of a pair conversation, or null. */
export function peerOf(conversation, me) {
  const m = /^p:(\d+):(\d+)$/.exec(conversation);
  if (!m) return null;
  const [a, b] = [Number(m[1]), Number(m[2])];
  return a === me ? b : b === me ? a : null;
}

const num = (value) => (value === undefined || value === null || value === "" ? 0 : Number(value));

/** A wire ChatMessage (or the route's JSON message) in one shape. */
export function normalize(m) {
  return {
    msgId: num(m.msgId),
    conversation: m.conversation || "",
    seq: num(m.seq),
    senderId: num(m.senderId ?? m.sendUserId),
    senderName: m.senderName ?? m.sendUserName ?? "",
    text: m.text ?? m.msg ?? "",
    timestamp: num(m.timestamp),
    clientMsgId: m.clientMsgId || "",
    receiveUserId: num(m.receiveUserId),
    groupId: m.groupId || "",
    epoch: m.epoch || "",
  };
}

/** This browser's device id, made once and kept. */
export function deviceId(storage = localStorage) {
  let id = storage.getItem("cim.device");
  if (!id || !/^[A-Za-z0-9_.-]{1,64}$/.test(id)) {
    const bytes = crypto.getRandomValues(new Uint8Array(9));
    id = "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    storage.setItem("cim.device", id);
  }
  return id;
}

/**
 * Per-conversation stream positions and seen seqs, and the outbox, of one
 * user, kept in local storage (see the top of this module).
 */
export class Cursors {
  constructor(userId, storage = localStorage) {
    this.key = `cim.state.${userId}`;
    this.storage = storage;
    this.streams = {}; // conversation -> {epoch, seq}
    this.seen = {}; // conversation -> {tag: seq}
    this.outbox = []; // [{clientMsgId, conversation, text, receiveUserId, groupId, at}]
    this.broadcastSeen = [];
    try {
      const data = JSON.parse(storage.getItem(this.key) || "{}");
      Object.assign(this.streams, data.streams || {});
      Object.assign(this.seen, data.seen || {});
      this.outbox = Array.isArray(data.outbox) ? data.outbox : [];
    } catch {
      // A damaged record: start again (the server resumes from its own).
    }
  }

  save() {
    const data = { streams: this.streams, seen: this.seen, outbox: this.outbox };
    try {
      this.storage.setItem(this.key, JSON.stringify(data));
    } catch {
      // Storage full or refused: live on in memory.
    }
  }

  /** The server (re)starts a stream after `seq` of `epoch`. */
  start(conversation, epoch, seq) {
    this.streams[conversation] = { epoch, seq: Math.max(0, seq) };
    this.save();
  }

  /** @return {{moved: boolean, isNew: boolean}} */
  received(conversation, tag, seq) {
    let moved = false;
    const stream = this.streams[conversation];
    if (!stream) {
      this.streams[conversation] = { epoch: tag, seq };
      moved = true;
    } else if (seq > stream.seq) {
      stream.seq = seq;
      moved = true;
    }
    const seen = (this.seen[conversation] ||= {});
    const isNew = seq > (seen[tag] || 0);
    if (isNew) {
      delete seen[tag]; // newest last: the oldest tags go first
      seen[tag] = seq;
      const tags = Object.keys(seen);
      while (tags.length > MAX_TAGS) delete seen[tags.shift()];
    }
    if (moved || isNew) this.save();
    return { moved, isNew };
  }

  /** Whether a message (tag, seq) was received before. */
  wasSeen(conversation, tag, seq) {
    return seq <= ((this.seen[conversation] || {})[tag] || 0);
  }

  cursor(conversation) {
    const { epoch, seq } = this.streams[conversation];
    return { conversation, seq: String(seq), epoch };
  }

  /** What a LOGIN_REQUEST carries: the streams past 0. */
  list() {
    return Object.keys(this.streams)
      .filter((c) => this.streams[c].seq > 0)
      .sort()
      .map((c) => this.cursor(c));
  }
}

/**
 * One logged-in user's live connection: logs in at the route, connects to
 * the server it names over WebSocket, resumes from the cursors, pings,
 * acknowledges, sends the outbox, and reconnects (through the route) after
 * any loss.  Events (an EventTarget; detail in each):
 *   state      {state: "connecting" | "online" | "offline", reason}
 *   routed     {reply}            the route's login succeeded (the token is new)
 *   login      {}                 the server's login succeeded: live
 *   message    {message, mine}    a message not shown before
 *   stored     {item, seq, msgId} the server stored a send of ours
 *   read       {readerId, conversation, seq}
 *   reset      {conversation}     the store lost messages of a conversation
 *   failed     {item, reason}     a send was refused for good
 *   kicked     {reason}           this device must stop (final)
 *   loggedout  {reason}           the token is no longer accepted
 */
export class Session extends EventTarget {
  constructor(route, account, device, { websocket = WebSocket } = {}) {
    super();
    this.route = route;
    this.account = account; // {userId, userName, token, deviceKey}
    this.device = device;
    this.cursors = new Cursors(account.userId);
    this.WebSocket = websocket;
    this.ws = null;
    this.state = "offline";
    this.stopped = false;
    this.attempt = 0;
    this.timers = { ping: null, ack: null, retry: null };
    this.dirty = new Set();
    this.pending = new Map(); // clientMsgId -> item sent on this connection
    this.server = null;
  }

  emit(type, detail = {}) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  setState(state, reason = "") {
    if (state === this.state && !reason) return;
    this.state = state;
    this.emit("state", { state, reason });
  }

  get userId() {
    return this.account.userId;
  }

  /** Log in at the route, then connect; retry with backoff on failure. */
  async start(reply = null) {
    this.stopped = false;
    clearTimeout(this.timers.retry);
    this.timers.retry = null;
    if (this.ws || this.starting) return;
    this.setState("connecting");
    this.starting = true;
    try {
      if (!reply) reply = await this.login();
    } finally {
      this.starting = false;
    }
    if (!reply || this.stopped || this.ws) return;
    this.account.token = reply.token;
    // Each login answers the device's next device key (the one used, if
    // any, stopped working): keep it for the next login.
    if (reply.deviceKey) this.account.deviceKey = reply.deviceKey;
    this.route.token = reply.token;
    localStorage.setItem("cim.account", JSON.stringify(this.account));
    this.server = reply;
    this.emit("routed", { reply });
    const url = webSocketUrl(reply);
    if (!url) {
      this.retry("the server has no WebSocket port");
      return;
    }
    this.connect(url);
  }

  /** The route's login with the device key; @return: its reply, or null. */
  async login() {
    try {
      // The proof: this device's device key (the freshest one stored:
      // another page of this browser may have used the last), else the
      // last token (a bearer token, valid while its session lives).
      const saved = storedAccount();
      if (saved && saved.userId === this.account.userId && saved.deviceKey) {
        this.account.deviceKey = saved.deviceKey;
      }
      const body = { userId: this.account.userId, userName: this.account.userName, device: this.device };
      if (this.account.deviceKey) body.deviceKey = this.account.deviceKey;
      return await this.route.call("/login", body, this.account.deviceKey ? null : this.account.token);
    } catch (e) {
      if (e.code === "9100" || e.code === "4010") {
        this.stop();
        this.emit("loggedout", { reason: e.message });
      } else {
        this.retry(e.message);
      }
      return null;
    }
  }

  retry(reason) {
    if (this.stopped) return;
    this.setState("offline", reason);
    const delay = Math.min(15_000, 500 * 2 ** Math.min(this.attempt, 5)) * (0.75 + Math.random() / 2);
    this.attempt += 1;
    clearTimeout(this.timers.retry);
    this.timers.retry = setTimeout(() => this.start(), delay);
  }

  /** Give up on the connection (the browser says the network is gone). */
  drop(reason) {
    const ws = this.ws;
    if (!ws) return;
    this.closed(ws, reason);
    ws.close();
  }

  /** Reconnect now (the network came back, or the user asked). */
  now() {
    if (this.stopped || this.ws) return;
    this.attempt = 0;
    this.start();
  }

  connect(url) {
    let ws;
    try {
      ws = new this.WebSocket(url, SUBPROTOCOL);
    } catch (e) {
      this.retry(`cannot connect to ${url}: ${e.message}`);
      return;
    }
    this.ws = ws;
    this.loggedIn = false;
    ws.onopen = () => {
      this.send({
        cmd: "LOGIN_REQUEST",
        requestId: String(this.userId),
        reqMsg: this.account.userName,
        token: this.account.token,
        cursors: this.cursors.list(),
      });
      this.lastHeard = Date.now();
      this.timers.ping = setInterval(() => this.heartbeat(ws), PING_INTERVAL);
    };
    ws.onmessage = (event) => {
      this.lastHeard = Date.now();
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      this.frame(frame);
    };
    ws.onclose = (event) => this.closed(ws, event.reason || `connection closed (${event.code})`);
    ws.onerror = () => {};
  }

  heartbeat(ws) {
    if (Date.now() - this.lastHeard > IDLE_TIMEOUT) {
      // A lost network closes nothing: give up on this connection.
      this.closed(ws, "the server stopped answering");
      ws.close();
      return;
    }
    this.send({ cmd: "PING", reqMsg: "ping" });
  }

  closed(ws, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.loggedIn = false;
    clearInterval(this.timers.ping);
    clearTimeout(this.timers.ack);
    this.timers.ack = null;
    this.pending.clear();
    if (!this.stopped) this.retry(reason);
  }

  /** Stop for good (log out, or a final kick). */
  stop() {
    this.stopped = true;
    clearTimeout(this.timers.retry);
    const ws = this.ws;
    this.ws = null;
    clearInterval(this.timers.ping);
    clearTimeout(this.timers.ack);
    if (ws) ws.close(1000, "bye");
    this.setState("offline");
  }

  send(frame) {
    if (!this.ws || this.ws.readyState !== 1) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  frame(frame) {
    const cmd = frame.cmd || "LOGIN_REQUEST";
    switch (cmd) {
      case "LOGIN_RESPONSE":
        this.loginResponse(frame);
        break;
      case "EPOCH":
        this.epochs(frame.cursors || []);
        break;
      case "MESSAGE":
      case "OFFLINE":
        for (const m of frame.messages || []) this.receive(normalize(m));
        break;
      case "ACK":
        this.acknowledged(frame);
        break;
      case "READ":
        for (const c of frame.cursors || []) {
          this.emit("read", { readerId: num(frame.requestId), conversation: c.conversation, seq: num(c.seq) });
        }
        break;
      case "ERROR":
        this.error(frame);
        break;
      case "KICK":
        this.kicked(frame);
        break;
      default:
        break; // PING's answer, and what a newer server may add
    }
  }

  loginResponse(frame) {
    this.loggedIn = true;
    this.attempt = 0;
    this.epochs(frame.cursors || []);
    this.setState("online");
    this.emit("login", {});
    this.flushOutbox();
  }

  epochs(cursors) {
    for (const c of cursors) {
      this.cursors.start(c.conversation, c.epoch || "", num(c.seq));
      if (c.reset) this.emit("reset", { conversation: c.conversation });
    }
  }

  receive(message) {
    const { conversation, seq, epoch } = message;
    const mine = message.senderId === this.userId;
    let isNew = true;
    if (conversation === "all") {
      if (this.cursors.broadcastSeen.includes(message.msgId)) isNew = false;
      else if (this.cursors.broadcastSeen.push(message.msgId) > 1000) this.cursors.broadcastSeen.shift();
    } else if (conversation && seq > 0) {
      const got = this.cursors.received(conversation, epoch, seq);
      isNew = got.isNew;
      if (got.moved) {
        this.dirty.add(conversation);
        if (!this.timers.ack) this.timers.ack = setTimeout(() => this.flushAcks(), ACK_DELAY);
      }
    }
    if (mine && message.clientMsgId) this.settle(message.clientMsgId, seq, message.msgId);
    if (isNew) this.emit("message", { message, mine });
  }

  flushAcks() {
    this.timers.ack = null;
    if (!this.dirty.size) return;
    const cursors = [...this.dirty].sort().map((c) => this.cursors.cursor(c));
    if (this.send({ cmd: "ACK", cursors })) this.dirty.clear();
  }

  acknowledged(frame) {
    if (frame.clientMsgId) this.settle(frame.clientMsgId, num(frame.seq), num(frame.msgId));
  }

  /** A send of ours was stored: out of the outbox. */
  settle(clientMsgId, seq, msgId) {
    const index = this.cursors.outbox.findIndex((i) => i.clientMsgId === clientMsgId);
    if (index < 0) return;
    const [item] = this.cursors.outbox.splice(index, 1);
    this.pending.delete(clientMsgId);
    this.cursors.save();
    this.emit("stored", { item, seq, msgId });
  }

  error(frame) {
    const item = frame.clientMsgId && this.cursors.outbox.find((i) => i.clientMsgId === frame.clientMsgId);
    const reason = frame.errorReason || `error ${frame.errorCode || ""}`;
    if (item && TRANSIENT_ERRORS.includes(Number(frame.errorCode))) {
      // Rate limited, or the store failed: the same send again, later.
      this.pending.delete(item.clientMsgId);
      setTimeout(() => {
        if (this.loggedIn && this.cursors.outbox.includes(item) && !this.pending.has(item.clientMsgId)) {
          this.transmit(item);
        }
      }, RESEND_DELAY);
    } else if (item) {
      this.cursors.outbox = this.cursors.outbox.filter((i) => i !== item);
      this.cursors.save();
      this.emit("failed", { item, reason });
    } else {
      this.emit("servererror", { code: frame.errorCode || 0, reason });
    }
  }

  kicked(frame) {
    const reason = frame.errorReason || "";
    if (FINAL_KICKS.includes(reason)) {
      this.stop();
      this.emit("kicked", { reason });
      return;
    }
    // The server is going away (or asked us to move): log in again.
    const ws = this.ws;
    if (ws) {
      this.closed(ws, reason || "the server asked us to reconnect");
      ws.close(1000);
    }
  }

  /** Queue a text for a private peer or a group; sent once online. */
  sendText(text, { receiveUserId = 0, groupId = "" }) {
    const conversation = groupId ? `g:${groupId}` : pairConversation(this.userId, receiveUserId);
    const item = {
      clientMsgId: crypto.randomUUID(),
      conversation,
      text,
      receiveUserId,
      groupId,
      at: Date.now(),
    };
    this.cursors.outbox.push(item);
    this.cursors.save();
    if (this.loggedIn) this.transmit(item);
    return item;
  }

  transmit(item) {
    const frame = { cmd: "MESSAGE", requestId: String(this.userId), reqMsg: item.text, clientMsgId: item.clientMsgId };
    if (item.groupId) frame.groupId = item.groupId;
    else frame.receiveUserId = String(item.receiveUserId);
    if (this.send(frame)) this.pending.set(item.clientMsgId, item);
  }

  /** After a (re)login: every send not yet stored, in order (the store drops repeats). */
  flushOutbox() {
    for (const item of this.cursors.outbox) {
      if (!this.pending.has(item.clientMsgId)) this.transmit(item);
    }
  }

  /** Tell the server (and so our other devices, and the peer) what we read. */
  markRead(conversation, seq) {
    if (this.send({ cmd: "READ", cursors: [{ conversation, seq: String(seq) }] })) return;
    this.route
      .call("/read", { userId: this.userId, conversation, seq })
      .catch(() => {});
  }
}

/**
 * The WebSocket URL of the server a login reply names: the reply's own
 * (the route tells cim's clients each server's), else one made from the
 * server's address and WebSocket port.
 */
export function webSocketUrl(reply) {
  for (const key of ["webSocketUrl", "websocketUrl", "wsUrl", "websocket", "ws"]) {
    const value = reply[key];
    if (typeof value === "string" && /^wss?:\/\//.test(value)) return value;
  }
  const port = reply.wsPort || reply.webSocketPort;
  if (port) {
    const scheme = location.protocol === "https:" || reply.tls ? "wss" : "ws";
    return `${scheme}://${reply.ip}:${port}/`;
  }
  return null;
}

/** Emoji aliases as the console renders them (cim/client/emoji.py). */
export function emojiRenderer(table) {
  return (text) => text.replace(/:([a-z0-9_+\-]+):/g, (whole, alias) => table[alias] ?? whole);
}
