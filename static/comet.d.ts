// Type definitions for comet.js, the browser client of the comet push server.

export interface CometStartOptions {
  /** Tenant number (default 0). */
  dev_id?: number;
  /** The user's id; omit or 0 for an anonymous connection. */
  user_id?: number | string;
  /** The key stored with `INSERT INTO users_auth`, or an HS256 JWT. */
  user_key?: string;
  /** host[:port] of the server; defaults to the host that served comet.js. */
  node?: string;
  /** Several nodes (a `--redis` cluster): the first is picked at random (the
   * list's first with `roundrobin`) and kept while it serves; when it closes
   * the connection or cannot be reached, the next one of the list is tried. */
  nodes?: string[];
  /** Use wss:// (default: when the page is https). */
  wss?: boolean;
  roundrobin?: boolean;
  /** A stable id of this browser, up to 32 of [A-Za-z0-9_-] (default: random, kept in localStorage). */
  uuid?: string;
  nostat?: boolean;
}

export interface CometServerInfo {
  user_id?: number;
  pipe: string;
  event: string;
  history: boolean;
  marker?: string;
  fromQueue: boolean;
}

export interface CometMessage<T = unknown> {
  /** The message; JSON text is parsed. */
  data: T;
  server_info: CometServerInfo;
}

export type CometCallback<T = unknown> = (msg: CometMessage<T>) => void;

export declare class cometServerApi {
  /** Connects, and reconnects after a close with jittered exponential backoff (0.5 s doubling to 30 s),
   * except after 4009 and 4400-4499. After 4029 it waits 10-20 s. When an upgrade fails before opening,
   * it GETs /info on the same node: a 503 or 429 there gives the server's Retry-After, and the client
   * waits between it and twice it. */
  start(opts?: CometStartOptions): boolean;
  stop(): void;
  restart(opts?: CometStartOptions): boolean;
  /** "channel", "channel.event", "msg", "msg.event", "#channel" (delivery reports), "" (everything), or several joined by "\n". Returns an id for unsubscription(). */
  subscription<T = unknown>(name: string, cb: CometCallback<T>): string | false;
  unsubscription(id: string): boolean;
  unsubscriptionAll(): void;
  web_pipe_send(pipe: string, event: string, msg: unknown): boolean;
  web_pipe_send(pipeDotEvent: string, msg: unknown): boolean;
  get_pipe_log<T = unknown>(pipe: string, cb?: CometCallback<T>): boolean;
  count_users_in_pipe(pipe: string, cb: CometCallback<{ user_in_pipe: number }>): boolean;
  getTrackPipeUsers(pipe: string, cb: CometCallback<Array<{ user_id: number; uuid: string }>>): boolean;
  getUserData(userId: number, cb: CometCallback<{ user_id: number; user_data: string }>): boolean;
  /** undefined until the server answered, then true or false. */
  isAuthorized(): boolean | undefined;
  isConnected(): boolean;
  getUserId(): number | string;
  getUUID(): string | null;
  onAuthSuccess(cb: () => void): void;
  /** The historical spelling; same as onAuthFail. */
  onAuthFalill(cb: () => void): void;
  onAuthFail(cb: () => void): void;
}

declare global {
  function CometServer(): cometServerApi;
  const cometApi: cometServerApi;
  const cometServerApi: { new (): cometServerApi };
}
