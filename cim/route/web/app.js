// cim web client: the page.  chat.js holds the connection and the cursors;
// this module shows them.  Every text from the network is set with
// textContent (never as markup), so "<img src=x onerror=...>" shows as
// those characters.

import {
  ApiError, Route, Session, deviceId, emojiRenderer, normalize, pairConversation, peerOf,
  storedAccount,
} from "./chat.js";

const PAGE = 30;
const ONLINE_POLL = 15_000;

const $ = (id) => document.getElementById(id);
const route = new Route();
const device = deviceId();
let emoji = (text) => text;
let session = null;
let account = null;
let current = null; // the open conversation's id
let onlineTimer = null;
const conversations = new Map();
const names = new Map(); // userId -> userName

// Small DOM helpers (text only)

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key.startsWith("aria-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function show(view) {
  $("login").hidden = view !== "login";
  $("app").hidden = view !== "app";
}

function describe(error, loggingIn = false) {
  switch (error.code) {
    case "4090":
      if (loggingIn) return "That name is taken, and this is not its password.";
      return error.message || String(error);
    case "9100":
      return "Wrong name or password.";
    case "6000":
      return "Too many attempts: wait a minute and try again.";
    case "network":
      return "The server cannot be reached. Try again in a moment.";
    default:
      return error.message || String(error);
  }
}

// Conversations

function conversation(id, facts = {}) {
  let conv = conversations.get(id);
  if (!conv) {
    conv = {
      id,
      peerId: peerOf(id, account.userId),
      groupId: id.startsWith("g:") ? id.slice(2) : "",
      epoch: "",
      lastSeq: 0,
      read: 0,
      peerRead: 0,
      entries: new Map(), // key -> entry
      byClient: new Map(), // clientMsgId -> key of a pending entry
      oldest: 0,
      loaded: false,
      complete: false,
      reset: false,
      groupReads: [],
      newest: 0, // the latest message's time
    };
    conversations.set(id, conv);
  }
  for (const [key, value] of Object.entries(facts)) {
    if (value !== undefined && value !== null) conv[key] = value;
  }
  return conv;
}

function title(conv) {
  if (conv.groupId) return `# ${conv.groupId}`;
  if (conv.id === "all") return "Everybody";
  return names.get(conv.peerId) || `user ${conv.peerId}`;
}

function unread(conv) {
  return Math.max(0, conv.lastSeq - conv.read);
}

/**
 * Replace the items of `list`; if the keyboard was on one of its buttons,
 * it stays on the button with the same `key` attribute (a list redrawn
 * while someone moves in it does not lose their place).
 */
function redrawList(list, key, items) {
  const active = document.activeElement;
  const focused = list.contains(active) ? active.getAttribute(key) : null;
  list.replaceChildren(...items);
  if (focused) {
    const again = list.querySelector(`[${key}="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
}

function renderList() {
  const list = $("conversations");
  const items = [...conversations.values()].filter((c) => c.id !== "all" || c.entries.size);
  items.sort((a, b) => latest(b) - latest(a) || title(a).localeCompare(title(b)));
  redrawList(list, "data-conversation", items.map((conv) => {
    const count = unread(conv);
    const button = el(
      "button",
      { type: "button", "data-conversation": conv.id, "aria-current": String(conv.id === current) },
      el("span", { class: "name", text: title(conv) }),
      count ? el("span", { class: "badge", text: String(count), "aria-label": `${count} unread` }) : null,
    );
    button.addEventListener("click", () => open(conv.id));
    return el("li", {}, button);
  }));
  $("no-conversations").hidden = items.length > 0;
  const total = items.reduce((sum, c) => sum + unread(c), 0);
  document.title = total ? `(${total}) cim` : "cim";
}

function latest(conv) {
  return conv.newest || conv.lastSeq;
}

let due = null;

/**
 * Show what changed in `conv` soon: a burst of messages (a replay after a
 * login) is drawn once, and read once.
 */
function refresh(conv, askReads = false) {
  due ??= { messages: false, reads: false, timer: setTimeout(redraw, 16) };
  if (conv.id === current) {
    due.messages = true;
    due.reads ||= askReads;
  }
}

function redraw() {
  const done = due;
  due = null;
  renderList();
  const conv = current && conversations.get(current);
  if (!conv || !done.messages) return;
  renderMessages();
  markRead(conv);
  if (done.reads) groupReads(conv);
}

async function refreshConversations() {
  try {
    const [known, groups] = await Promise.all([
      route.call("/conversations", { userId: account.userId }).catch((e) => {
        if (e.code === "3000") return []; // a route from before conversations
        throw e;
      }),
      route.call("/user/groups", { userId: account.userId }),
    ]);
    for (const c of known) {
      if (c.peerId && c.peerName) names.set(Number(c.peerId), c.peerName);
      const conv = conversation(c.conversation);
      conv.epoch = c.epoch || conv.epoch;
      conv.lastSeq = Math.max(conv.lastSeq, Number(c.lastSeq) || 0);
      conv.read = Math.max(conv.read, Number(c.read) || 0);
      conv.peerRead = Math.max(conv.peerRead, Number(c.peerRead) || 0);
    }
    for (const groupId of groups || []) conversation(`g:${groupId}`);
  } catch (e) {
    notice(describe(e));
  }
  renderList();
  if (current) renderMessages();
}

// Messages

function keyOf(message) {
  return `${message.epoch}:${message.seq}`;
}

/** Add a stored message to its conversation (once). @return: whether it was new. */
function addMessage(message) {
  const conv = conversation(message.conversation);
  if (message.senderId && message.senderName) names.set(message.senderId, message.senderName);
  if (message.clientMsgId && conv.byClient.has(message.clientMsgId)) {
    conv.entries.delete(conv.byClient.get(message.clientMsgId));
    conv.byClient.delete(message.clientMsgId);
  }
  const key = keyOf(message);
  if (conv.entries.has(key)) return false;
  const mine = message.senderId === account.userId;
  conv.entries.set(key, { key, ...message, mine, state: "stored" });
  conv.newest = Math.max(conv.newest, message.timestamp || 0);
  if (!conv.epoch || message.epoch === conv.epoch) {
    conv.epoch = message.epoch;
    conv.lastSeq = Math.max(conv.lastSeq, message.seq);
    if (mine) conv.read = Math.max(conv.read, message.seq);
  }
  return true;
}

function order(a, b) {
  const pa = !a.seq;
  const pb = !b.seq;
  if (pa || pb) return pa === pb ? a.at - b.at : pa ? 1 : -1;
  if (a.epoch === b.epoch) return a.seq - b.seq;
  return a.timestamp - b.timestamp;
}

function stateOf(conv, entry) {
  if (!entry.mine) return "";
  if (entry.state === "failed") return `not sent: ${entry.reason}`;
  if (!entry.seq) return "sending…";
  if (conv.peerId) return conv.peerRead >= entry.seq ? "read" : "stored";
  if (conv.groupId) {
    const readers = conv.groupReads.filter((r) => r.userId !== account.userId && r.read >= entry.seq).length;
    return readers ? `read by ${readers}` : "stored";
  }
  return "stored";
}

function renderMessages() {
  const conv = conversations.get(current);
  if (!conv) return;
  const scroller = $("scroller");
  const fromBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight;
  const entries = [...conv.entries.values()].sort(order);
  $("messages").replaceChildren(
    ...entries.map((entry) => {
      const state = stateOf(conv, entry);
      const time = entry.timestamp ? new Date(entry.timestamp) : null;
      return el(
        "li",
        {
          class: `msg${entry.mine ? " mine" : ""}`,
          "data-key": entry.key,
          "data-seq": String(entry.seq || ""),
          "data-state": entry.mine ? entry.state === "failed" ? "failed" : !entry.seq ? "sending" : state.startsWith("read") ? "read" : "stored" : "",
        },
        el(
          "div",
          { class: "meta" },
          el("span", { class: "sender", text: entry.mine ? "you" : entry.senderName || `user ${entry.senderId}` }),
          time ? el("time", { dateTime: time.toISOString(), text: time.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) }) : null,
        ),
        el("p", { class: "text", text: emoji(entry.text) }),
        state ? el("div", { class: `state${entry.state === "failed" ? " failed" : ""}`, text: state }) : null,
      );
    }),
  );
  $("earlier").hidden = conv.complete || !conv.loaded;
  $("notice").hidden = !conv.reset;
  if (conv.reset) $("notice").textContent = "Some messages of this conversation were lost by the server's store.";
  if (fromBottom < 80) scroller.scrollTop = scroller.scrollHeight;
  else scroller.scrollTop = scroller.scrollHeight - scroller.clientHeight - fromBottom;
}

function notice(text) {
  const box = $("notice");
  box.textContent = text;
  box.hidden = !text;
}

async function loadEarlier(conv) {
  if (conv.complete || conv.loading) return;
  conv.loading = true;
  const body = { userId: account.userId, limit: PAGE, beforeSeq: conv.oldest || 0 };
  if (conv.peerId) body.peerId = conv.peerId;
  else body.conversation = conv.id;
  try {
    const page = (await route.call("/history", body)).map(normalize);
    const scroller = $("scroller");
    const fromBottom = scroller.scrollHeight - scroller.scrollTop;
    for (const m of page) {
      addMessage(m);
      if (!conv.oldest || m.seq < conv.oldest) conv.oldest = m.seq;
    }
    conv.complete = page.length < PAGE || conv.oldest <= 1;
    conv.loaded = true;
    if (conv.id === current) {
      renderMessages();
      if (body.beforeSeq) scroller.scrollTop = scroller.scrollHeight - fromBottom;
    }
  } catch (e) {
    if (conv.id === current) notice(describe(e));
  } finally {
    conv.loading = false;
  }
}

function markRead(conv) {
  if (!session || document.visibilityState !== "visible" || conv.id !== current) return;
  if (conv.lastSeq > conv.read) {
    conv.read = conv.lastSeq;
    session.markRead(conv.id, conv.lastSeq);
    renderList();
  }
}

async function open(id) {
  current = id;
  const conv = conversation(id);
  $("chat-title").textContent = title(conv);
  $("members").hidden = !conv.groupId;
  $("leave").hidden = !conv.groupId;
  $("member-list").hidden = $("group-admin").hidden = true;
  notice("");
  $("compose-text").disabled = id === "all";
  $("send").disabled = id === "all";
  $("app").classList.add("in-chat");
  renderList();
  renderMessages();
  $("compose-text").focus();
  if (!conv.loaded) await loadEarlier(conv);
  if (conv.groupId) groupReads(conv);
  markRead(conv);
}

function groupReads(conv) {
  route
    .call("/readPositions", { userId: account.userId, conversation: conv.id })
    .then((reads) => {
      conv.groupReads = reads.map((r) => ({ userId: Number(r.userId), read: Number(r.read) }));
      if (conv.id === current) renderMessages();
    })
    .catch(() => {});
}

function back() {
  $("app").classList.remove("in-chat");
  const button = current && document.querySelector(`[data-conversation="${CSS.escape(current)}"]`);
  (button || $("conversations").querySelector("button") || $("group-id")).focus();
}

// Sending

function send() {
  const box = $("compose-text");
  const text = box.value.trim();
  const conv = current && conversations.get(current);
  if (!text || !conv || !session) return;
  const target = conv.groupId ? { groupId: conv.groupId } : { receiveUserId: conv.peerId };
  const item = session.sendText(text, target);
  pendingEntry(item);
  box.value = "";
  renderMessages();
}

function pendingEntry(item) {
  const conv = conversation(item.conversation);
  const key = `c:${item.clientMsgId}`;
  if (conv.entries.has(key)) return;
  conv.byClient.set(item.clientMsgId, key);
  conv.newest = Math.max(conv.newest, item.at);
  conv.entries.set(key, {
    key,
    seq: 0,
    epoch: "",
    text: item.text,
    timestamp: item.at,
    at: item.at,
    mine: true,
    state: "sending",
    senderId: account.userId,
    senderName: account.userName,
    clientMsgId: item.clientMsgId,
  });
}

// Session events

function startSession(acc, reply = null) {
  account = acc;
  route.token = acc.token;
  names.set(acc.userId, acc.userName);
  $("me").textContent = acc.userName;
  show("app");
  session = new Session(route, acc, device);
  session.addEventListener("state", ({ detail }) => {
    const status = $("status");
    status.className = `status ${detail.state}`;
    status.textContent =
      detail.state === "online" ? "online" : detail.state === "connecting" ? "connecting…" : "offline";
    status.title = detail.reason || "";
  });
  session.addEventListener("routed", () => {
    refreshConversations();
    refreshOnline();
  });
  session.addEventListener("message", ({ detail }) => {
    const { message } = detail;
    if (!detail.mine) maybeRefreshOnline(message.senderId);
    if (!addMessage(message)) return;
    // A member who writes has read up to there (groups' read positions
    // are asked for, not pushed).
    const conv = conversations.get(message.conversation);
    refresh(conv, Boolean(conv.groupId && !detail.mine));
  });
  session.addEventListener("stored", ({ detail }) => {
    const conv = conversation(detail.item.conversation);
    const key = conv.byClient.get(detail.item.clientMsgId);
    const entry = key && conv.entries.get(key);
    if (entry) {
      entry.seq = detail.seq;
      entry.epoch = conv.epoch;
      entry.state = "stored";
      conv.lastSeq = Math.max(conv.lastSeq, detail.seq);
      conv.read = Math.max(conv.read, detail.seq);
    }
    if (conv.id === current) renderMessages();
  });
  session.addEventListener("failed", ({ detail }) => {
    const conv = conversation(detail.item.conversation);
    const entry = conv.entries.get(conv.byClient.get(detail.item.clientMsgId));
    if (entry) Object.assign(entry, { state: "failed", reason: detail.reason });
    if (conv.id === current) renderMessages();
  });
  session.addEventListener("read", ({ detail }) => {
    const conv = conversation(detail.conversation);
    if (detail.readerId === account.userId) conv.read = Math.max(conv.read, detail.seq);
    else if (detail.readerId === conv.peerId) conv.peerRead = Math.max(conv.peerRead, detail.seq);
    else {
      const reader = conv.groupReads.find((r) => r.userId === detail.readerId);
      if (reader) reader.read = Math.max(reader.read, detail.seq);
      else conv.groupReads.push({ userId: detail.readerId, read: detail.seq });
    }
    renderList();
    if (conv.id === current) renderMessages();
  });
  session.addEventListener("reset", ({ detail }) => {
    const conv = conversation(detail.conversation);
    conv.reset = true;
    conv.epoch = "";
    conv.lastSeq = 0;
    conv.read = 0;
    if (conv.id === current) renderMessages();
    refreshConversations();
  });
  session.addEventListener("servererror", ({ detail }) => notice(detail.reason));
  session.addEventListener("kicked", ({ detail }) => {
    // Another page of this browser (the same device) or the device limit:
    // stop here, and offer to take over again.
    notice(`This page stopped: ${detail.reason}.`);
    $("resume").hidden = false;
  });
  session.addEventListener("loggedout", () => {
    logout("Your login expired: log in again.", false);
  });
  // Sends typed before a reload wait in the outbox: show them.
  for (const item of session.cursors.outbox) pendingEntry(item);
  session.start(reply);
  clearInterval(onlineTimer);
  onlineTimer = setInterval(refreshOnline, ONLINE_POLL);
  renderList();
}

let onlineAsked = 0;

/** A message from someone not listed online: ask again (at most every 3 s). */
function maybeRefreshOnline(userId) {
  if (document.querySelector(`#online [data-user="${userId}"]`)) return;
  if (Date.now() - onlineAsked < 3000) return;
  refreshOnline();
}

async function refreshOnline() {
  if (!account) return;
  onlineAsked = Date.now();
  let users = [];
  try {
    users = await route.onlineUsers();
  } catch {
    return;
  }
  const list = $("online");
  const others = users.filter((u) => Number(u.userId) !== account.userId);
  for (const u of others) names.set(Number(u.userId), u.userName);
  redrawList(list, "data-user", others.map((u) => {
    const id = Number(u.userId);
    const button = el("button", { type: "button", "data-user": String(id) }, el("span", { class: "name", text: u.userName }));
    button.addEventListener("click", () => open(pairConversation(account.userId, id)));
    return el("li", {}, button);
  }));
  if (!others.length) list.replaceChildren(el("li", { class: "hint", text: "Nobody else is online." }));
  renderList();
  if (current) $("chat-title").textContent = title(conversation(current));
}

/**
 * Log this device off at the route, which forgets its device key too: with
 * the token while its session lives, else (the connection was gone) with a
 * token the device key gets for that.
 */
async function logOffAtRoute(acc) {
  try {
    await route.call("/offLine", { userId: acc.userId });
    return;
  } catch (e) {
    if (!(e instanceof ApiError) || e.code !== "4010") return;
  }
  const saved = storedAccount();
  const deviceKey = saved && saved.userId === acc.userId ? saved.deviceKey : acc.deviceKey;
  if (!deviceKey) return;
  try {
    const reply = await route.call(
      "/login", { userId: acc.userId, userName: acc.userName, device, deviceKey }, null,
    );
    await route.call("/offLine", { userId: acc.userId }, reply.token);
  } catch {
    // The key is unusable already.
  }
}

async function logout(message = "", tellRoute = true) {
  const was = session;
  session = null;
  // No reconnect from here on; the connection stays open until the route
  // logged the device off (its token dies with the connection).
  if (was) was.stopped = true;
  clearInterval(onlineTimer);
  if (tellRoute && account) await logOffAtRoute(account);
  if (was) was.stop();
  // Forget the token and the device key (/offLine made the route forget
  // the key too): the next login needs the password.
  localStorage.removeItem("cim.account");
  account = null;
  route.token = null;
  current = null;
  conversations.clear();
  $("messages").replaceChildren();
  $("app").classList.remove("in-chat");
  $("login-error").textContent = message;
  show("login");
  $("login-name").focus();
}

// Log in

async function login(event) {
  event.preventDefault();
  const userName = $("login-name").value.trim();
  const password = $("login-password").value;
  const error = $("login-error");
  error.textContent = "";
  if (!userName || !password) {
    error.textContent = "Give a name and a password.";
    return;
  }
  $("login-submit").disabled = true;
  try {
    const who = await route.call("/registerAccount", { userName, password });
    const reply = await route.call("/login", {
      userId: who.userId,
      userName: who.userName,
      password,
      device,
    });
    // The password stops here: later logins prove the device with its
    // device key (kept in local storage by the session).
    const acc = {
      userId: Number(reply.userId ?? who.userId),
      userName: reply.userName ?? who.userName,
      token: reply.token,
      deviceKey: reply.deviceKey,
    };
    localStorage.setItem("cim.account", JSON.stringify(acc));
    $("login-password").value = "";
    startSession(acc, reply);
  } catch (e) {
    error.textContent = e instanceof ApiError ? describe(e, true) : String(e);
  } finally {
    $("login-submit").disabled = false;
  }
}

// Groups

async function group(action) {
  const error = $("group-error");
  error.textContent = "";
  const input = $("group-id");
  const groupId = input.value.trim();
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(groupId)) {
    error.textContent = "A group id is 1-64 letters, digits, '_', '-' or '.'.";
    input.focus();
    return;
  }
  try {
    if (action === "create") {
      await route.call("/group/create", { userId: account.userId, groupId, policy: $("group-policy").value });
    } else {
      const done = await route.call("/group/join", { userId: account.userId, groupId });
      if (!done.joined) {
        error.textContent = done.pending ? "Asked to join: the owner decides." : "Not joined.";
        return;
      }
    }
    input.value = "";
    conversation(`g:${groupId}`);
    await open(`g:${groupId}`);
  } catch (e) {
    error.textContent = describe(e);
  }
}

async function leave() {
  const conv = conversations.get(current);
  if (!conv || !conv.groupId) return;
  try {
    await route.call("/group/leave", { userId: account.userId, groupId: conv.groupId });
  } catch (e) {
    notice(describe(e));
    return;
  }
  conversations.delete(conv.id);
  current = null;
  $("chat-title").textContent = "Pick a conversation";
  $("messages").replaceChildren();
  $("members").hidden = $("leave").hidden = $("member-list").hidden = $("group-admin").hidden = true;
  renderList();
  back();
}

async function members() {
  const conv = conversations.get(current);
  const list = $("member-list");
  if (!conv || !conv.groupId) return;
  if (!list.hidden) {
    list.hidden = $("group-admin").hidden = true;
    return;
  }
  try {
    const groupId = conv.groupId;
    const [people, info] = await Promise.all([
      route.call("/group/members", { userId: account.userId, groupId }),
      route.call("/group/info", { userId: account.userId, groupId }),
    ]);
    people.sort((x, y) => x.userName.localeCompare(y.userName));
    for (const p of people) names.set(Number(p.userId), p.userName);
    list.replaceChildren(...people.map((p) => el("li", { text: p.userName })));
    list.hidden = false;
    const owner = Number(info.ownerId) === account.userId;
    $("group-admin").hidden = !owner;
    $("invite-result").textContent = "";
    $("h-requests").hidden = $("requests").hidden = info.policy !== "approval";
    if (owner && info.policy === "approval") await requests(groupId);
  } catch (e) {
    notice(describe(e));
  }
}

/** The users waiting for the owner's answer, each with Approve and Reject. */
async function requests(groupId) {
  const waiting = await route.call("/group/requests", { userId: account.userId, groupId });
  const list = $("requests");
  if (!waiting.length) {
    list.replaceChildren(el("li", { class: "hint", text: "Nobody is waiting." }));
    return;
  }
  list.replaceChildren(
    ...waiting.map((w) => {
      const id = Number(w.userId);
      names.set(id, w.userName);
      const row = el("li", { class: "requests-row", "data-user": String(id) }, el("span", { class: "name", text: w.userName }));
      for (const [label, path] of [["Approve", "/group/approve"], ["Reject", "/group/reject"]]) {
        const button = el("button", { type: "button", text: label, "aria-label": `${label} ${w.userName}` });
        button.addEventListener("click", () => answer(groupId, path, id));
        row.append(button);
      }
      return row;
    }),
  );
}

async function answer(groupId, path, requesterId) {
  try {
    await route.call(path, { userId: account.userId, groupId, requesterId });
    await requests(groupId);
    const people = await route.call("/group/members", { userId: account.userId, groupId });
    people.sort((x, y) => x.userName.localeCompare(y.userName));
    $("member-list").replaceChildren(...people.map((p) => el("li", { text: p.userName })));
  } catch (e) {
    notice(describe(e));
  }
}

/** A user name as the route compares them (case and width do not matter). */
function nameKey(name) {
  return name.trim().normalize("NFKC").toLowerCase();
}

/** The id of the user called C{name}: among those online or known here. */
async function findUser(name) {
  const key = nameKey(name);
  const known = () => [...names].find(([, n]) => nameKey(n) === key);
  if (!known()) await refreshOnline();
  const found = known();
  return found ? found[0] : null;
}

async function invite() {
  const conv = conversations.get(current);
  const input = $("invite-name");
  const result = $("invite-result");
  const name = input.value.trim();
  if (!conv || !conv.groupId || !name) return;
  const inviteeId = await findUser(name);
  if (inviteeId === null) {
    result.textContent = `Nobody called ${name} is online or in your conversations.`;
    input.focus();
    return;
  }
  try {
    await route.call("/group/invite", { userId: account.userId, groupId: conv.groupId, inviteeId });
    result.textContent = `Invited ${names.get(inviteeId) || name}: they may join # ${conv.groupId} now.`;
    input.value = "";
  } catch (e) {
    result.textContent = describe(e);
  }
}

// Wiring

function arrowKeys(event) {
  if (event.key !== "ArrowDown" && event.key !== "ArrowUp") return;
  const buttons = [...event.currentTarget.querySelectorAll("button")];
  const at = buttons.indexOf(document.activeElement);
  if (at < 0) return;
  event.preventDefault();
  const next = buttons[(at + (event.key === "ArrowDown" ? 1 : buttons.length - 1)) % buttons.length];
  next.focus();
}

function wire() {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", () => logout());
  $("resume").addEventListener("click", () => {
    $("resume").hidden = true;
    notice("");
    if (session) session.start();
  });
  $("back").addEventListener("click", back);
  $("compose").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("compose-text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("group-form").addEventListener("submit", (e) => {
    e.preventDefault();
    group("join");
  });
  $("group-create").addEventListener("click", () => group("create"));
  $("leave").addEventListener("click", leave);
  $("members").addEventListener("click", members);
  $("invite-form").addEventListener("submit", (e) => {
    e.preventDefault();
    invite();
  });
  $("earlier").addEventListener("click", () => {
    const conv = conversations.get(current);
    if (conv) loadEarlier(conv);
  });
  $("scroller").addEventListener("scroll", () => {
    const conv = conversations.get(current);
    if (conv && conv.loaded && !conv.complete && $("scroller").scrollTop < 40) loadEarlier(conv);
  });
  $("conversations").addEventListener("keydown", arrowKeys);
  $("online").addEventListener("keydown", arrowKeys);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !$("app").hidden && current) back();
  });
  document.addEventListener("visibilitychange", () => {
    const conv = current && conversations.get(current);
    if (conv) markRead(conv);
  });
  window.addEventListener("online", () => session && session.now());
  window.addEventListener("offline", () => session && session.drop("the network is down"));
}

async function main() {
  wire();
  try {
    const response = await fetch("/emoji.json");
    emoji = emojiRenderer(await response.json());
  } catch {
    // Aliases stay as typed.
  }
  const saved = storedAccount();
  if (saved && (saved.deviceKey || saved.token)) {
    startSession({
      userId: saved.userId, userName: saved.userName, token: saved.token, deviceKey: saved.deviceKey,
    });
  } else {
    show("login");
    $("login-name").focus();
  }
}

main();
