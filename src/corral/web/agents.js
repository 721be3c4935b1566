// The agents view: every agent with its live state (starting, ready, failed with the error),
// and a form to create one. Creating answers at once with `starting`; the start runs on the
// server, so the view polls GET /v1/agents while any agent is still starting (there is no
// agent event on the feed), and stops polling when none is or the view is hidden.

import {del, get, post} from './api.js';
import {h, toast} from './dom.js';

const POLL_MS = 400;
const KNOWN_TOOLS = ['wait', 'echo', 'shell', 'read_file', 'write_file', 'list_dir', 'edit_file', 'http_fetch',
  'spawn_subagent', 'wait_subagents', 'schedule'];

export class AgentsView {
  constructor(root, {onChat, admin}) {
    this.root = root;
    this.onChat = onChat;
    this.admin = admin;
    this.list = root.querySelector('[data-testid="agent-list"]');
    this.form = root.querySelector('[data-testid="agent-form"]');
    this.cards = new Map(); // name -> {el, key}
    this.agents = [];
    this.visible = false;
    this.timer = null;
    this.form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.create();
    });
    this.field('provider').addEventListener('change', () => this.providerFields());
    this.field('tools').addEventListener('input', () => this.approvalFields());
    root.querySelector('#tool-names').replaceChildren(...KNOWN_TOOLS.map((name) => h('option', {value: name})));
    this.providerFields();
    this.approvalFields();
  }

  field(name) {
    return this.form.elements.namedItem(name);
  }

  show(visible) {
    this.visible = visible;
    if (visible) this.refresh();
    else clearTimeout(this.timer);
  }

  async refresh() {
    clearTimeout(this.timer);
    try {
      this.agents = await get('/v1/agents');
    } catch (error) {
      toast(error.message);
      return;
    }
    this.render();
    if (this.visible && this.agents.some((a) => a.state === 'starting')) {
      this.timer = setTimeout(() => this.refresh(), POLL_MS);
    }
  }

  render() {
    const seen = new Set();
    let previous = null;
    for (const agent of this.agents) {
      seen.add(agent.name);
      const key = JSON.stringify([agent.state, agent.error, agent.generation, agent.model, agent.tools,
        agent.mcp_servers]);
      let card = this.cards.get(agent.name);
      if (!card || card.key !== key) {
        const el = this.card(agent);
        if (card) card.el.replaceWith(el);
        card = {el, key};
        this.cards.set(agent.name, card);
      }
      if (card.el.previousElementSibling !== previous || !card.el.isConnected) {
        if (previous) previous.after(card.el);
        else this.list.prepend(card.el);
      }
      previous = card.el;
    }
    for (const [name, card] of this.cards) {
      if (!seen.has(name)) {
        card.el.remove();
        this.cards.delete(name);
      }
    }
  }

  card(agent) {
    const model = agent.driver === 'acp' ? 'external agent (ACP)'
      : agent.model ? `${agent.provider} · ${agent.model}` : agent.provider;
    const stateLabel = {starting: 'starting…', ready: 'ready', failed: 'failed'}[agent.state] || agent.state;
    const actions = h('div', {class: 'card-actions'});
    if (agent.state === 'ready') {
      actions.append(h('button', {class: 'btn btn-sm', type: 'button', testid: 'agent-chat',
        onclick: () => this.onChat(agent.name)}, 'New chat'));
    }
    if (this.admin() && agent.state === 'failed') {
      actions.append(h('button', {class: 'btn btn-sm', type: 'button', testid: 'agent-restart',
        onclick: () => this.restart(agent.name)}, 'Restart'));
    }
    if (this.admin()) {
      const remove = h('button', {class: 'btn btn-sm btn-quiet', type: 'button', testid: 'agent-delete'}, 'Delete');
      remove.addEventListener('click', () => {
        if (remove.dataset.confirm !== 'yes') {
          remove.dataset.confirm = 'yes';
          remove.textContent = 'Delete?';
          return;
        }
        this.remove(agent.name);
      });
      actions.append(remove);
    }
    const servers = (agent.mcp_servers || []).map((srv) => h('li', {class: `mcp mcp-${srv.state}`},
      `${srv.name}: ${srv.state}${srv.error ? ` (${srv.error})` : ''}`));
    return h('article', {class: 'card agent-card', testid: 'agent-row', dataset: {agent: agent.name, state: agent.state}},
      h('header', {class: 'card-head'},
        h('h3', {class: 'agent-name'}, agent.name),
        h('span', {class: `badge state-${agent.state}`, testid: 'agent-state', dataset: {state: agent.state}},
          stateLabel)),
      h('p', {class: 'muted'}, model),
      h('div', {class: 'tool-chips'}, agent.tools.length
        ? agent.tools.map((tool) => h('span', {class: 'tool-chip'}, tool))
        : h('span', {class: 'muted'}, 'no tools')),
      agent.error ? h('p', {class: 'agent-error', testid: 'agent-error'}, agent.error) : null,
      servers.length ? h('ul', {class: 'mcp-list'}, servers) : null,
      agent.system_prompt ? h('p', {class: 'agent-prompt', title: agent.system_prompt}, agent.system_prompt) : null,
      actions);
  }

  providerFields() {
    const demo = this.field('provider').value === 'demo';
    for (const el of this.form.querySelectorAll('[data-provider]')) {
      el.hidden = (el.dataset.provider === 'demo') !== demo;
    }
  }

  tools() {
    return this.field('tools').value.split(/[\s,]+/).filter(Boolean);
  }

  approvalFields() {
    const host = this.form.querySelector('[data-testid="agent-approvals"]');
    const previous = new Map([...host.querySelectorAll('select')].map((s) => [s.name, s.value]));
    host.replaceChildren(...this.tools().map((tool) => h('label', {class: 'approval-row'},
      h('span', {class: 'mono'}, tool),
      h('select', {name: `approval:${tool}`, testid: `approval-policy-${tool}`},
        ['auto', 'ask', 'deny'].map((value) => h('option', {value, selected: previous.get(`approval:${tool}`) === value},
          value))))));
  }

  body() {
    const value = (name) => this.field(name).value.trim();
    const provider = value('provider');
    const spec = {name: value('name'), provider, tools: this.tools()};
    if (value('model')) spec.model = value('model');
    if (value('system_prompt')) spec.system_prompt = value('system_prompt');
    const options = {};
    const numbers = provider === 'demo' ? ['latency_ms', 'token_ms', 'startup_ms'] : ['timeout_s'];
    for (const name of numbers) {
      if (value(name) !== '') options[name] = Number(value(name));
    }
    if (provider !== 'demo') {
      for (const name of ['base_url', 'api_key_env']) if (value(name)) options[name] = value(name);
    }
    if (Object.keys(options).length) spec.provider_options = options;
    const approvals = {};
    for (const select of this.form.querySelectorAll('[data-testid="agent-approvals"] select')) {
      if (select.value !== 'auto') approvals[select.name.slice('approval:'.length)] = select.value;
    }
    if (Object.keys(approvals).length) spec.policy = {approvals};
    return spec;
  }

  async create() {
    const button = this.form.querySelector('[type="submit"]');
    button.disabled = true;
    try {
      const agent = await post('/v1/agents', this.body());
      toast(`Agent ${agent.name} created; starting…`, 'info');
      this.field('name').value = '';
      await this.refresh();
    } catch (error) {
      toast(error.message);
    } finally {
      button.disabled = false;
    }
  }

  async restart(name) {
    try {
      await post(`/v1/agents/${encodeURIComponent(name)}/restart`, {});
      await this.refresh();
    } catch (error) {
      toast(error.message);
    }
  }

  async remove(name) {
    try {
      await del(`/v1/agents/${encodeURIComponent(name)}`);
      await this.refresh();
    } catch (error) {
      toast(error.message);
    }
  }
}
