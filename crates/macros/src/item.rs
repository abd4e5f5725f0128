//! Parsing and validation of the annotated item: an `async fn`, or an `impl` block holding one
//! `async fn(&self, ...)` for a handler with state.

use proc_macro2::{Delimiter, Group, Span};
use quote::ToTokens;
use syn::parse::{Parse, ParseStream};
use syn::{
    Attribute, FnArg, GenericArgument, ImplItem, ImplItemFn, ItemImpl, PatType, PathArguments,
    ReturnType, Signature, Type, Visibility,
};

/// The annotated function. The body is kept as raw tokens: it is pasted into the generated
/// `call` unchanged, so there is no need to parse it (which also keeps the macro fast while
/// the body is being edited).
pub(crate) struct HandlerFn {
    /// Outer attributes, doc comments included.
    pub(crate) attrs: Vec<Attribute>,
    /// The function's visibility; the generated struct gets the same one.
    pub(crate) vis: Visibility,
    /// The signature as written.
    pub(crate) sig: Signature,
    /// The `{ ... }` body.
    pub(crate) body: Group,
}

impl Parse for HandlerFn {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let attrs = input.call(Attribute::parse_outer)?;
        let vis: Visibility = input.parse()?;
        if input.fork().parse::<Signature>().is_err() {
            return Err(input.error(format!(
                "#[oncely::handler] applies to an `async fn` or an `impl` block: {}",
                expected("NAME", Form::Free)
            )));
        }
        let sig: Signature = input.parse()?;
        let body: Group = input.parse()?;
        if body.delimiter() != Delimiter::Brace {
            return Err(syn::Error::new(
                body.span(),
                "expected a function body `{ ... }`",
            ));
        }
        if !input.is_empty() {
            return Err(input.error("unexpected tokens after the function body"));
        }
        Ok(HandlerFn {
            attrs,
            vis,
            sig,
            body,
        })
    }
}

/// The pieces of a valid handler signature.
pub(crate) struct HandlerSig<'a> {
    /// `conn: &mut AsyncPgConnection`, as written.
    pub(crate) conn: &'a PatType,
    /// `msg: Envelope<T>`, as written.
    pub(crate) msg: &'a PatType,
    /// `T` from `Envelope<T>`.
    pub(crate) message: &'a Type,
    /// The return type, as written.
    pub(crate) output: &'a Type,
}

/// The annotated `impl` block of a handler with state: the method is the handler's body, and
/// the value it is called on is the handler.
pub(crate) struct HandlerImpl {
    /// The block as written; it is emitted unchanged.
    pub(crate) block: ItemImpl,
}

impl Parse for HandlerImpl {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        Ok(HandlerImpl {
            block: input.parse()?,
        })
    }
}

impl HandlerImpl {
    /// Checks that the block is a plain inherent `impl` holding exactly one method, and that
    /// method's signature; returns the method with the pieces of its signature.
    pub(crate) fn validate(&self) -> syn::Result<(&ImplItemFn, HandlerSig<'_>)> {
        let block = &self.block;
        let usage = "a handler with state is `#[oncely::handler(consumer = ...)] impl Type { \
                     async fn NAME(&self, conn: &mut AsyncPgConnection, msg: Envelope<T>) \
                     -> Result<(), HandlerError> { ... } }`";
        if let Some((_, path, _)) = &block.trait_ {
            return Err(syn::Error::new_spanned(
                path,
                format!(
                    "#[oncely::handler] goes on an inherent `impl` block, not a trait impl; {usage}"
                ),
            ));
        }
        if !block.generics.params.is_empty() || block.generics.where_clause.is_some() {
            return Err(syn::Error::new_spanned(
                &block.generics,
                format!("oncely handlers cannot be generic; {usage}"),
            ));
        }
        let methods: Vec<&ImplItemFn> = block
            .items
            .iter()
            .filter_map(|item| match item {
                ImplItem::Fn(method) => Some(method),
                _ => None,
            })
            .collect();
        // One method, so there is no question which one handles: helpers go in another block.
        let [method] = methods.as_slice() else {
            return Err(syn::Error::new(
                block.impl_token.span,
                format!(
                    "the `impl` block of a handler holds exactly one method, found {}; \
                     put other methods in another `impl` block; {usage}",
                    methods.len()
                ),
            ));
        };
        Ok((method, validate(&method.sig, Form::Method)?))
    }
}

/// Where the handler's body is written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// A free `async fn(conn, msg)`.
    Free,
    /// An `async fn(&self, conn, msg)` in an `impl` block.
    Method,
}

/// The signature every error message points to.
fn expected(name: &str, form: Form) -> String {
    let receiver = match form {
        Form::Free => "",
        Form::Method => "&self, ",
    };
    format!(
        "expected `async fn {name}({receiver}conn: &mut AsyncPgConnection, msg: Envelope<T>) \
         -> Result<(), HandlerError>`"
    )
}

/// Looks through the invisible groups `macro_rules!` puts around `$t:ty`, and parentheses.
fn peel(ty: &Type) -> &Type {
    match ty {
        Type::Group(group) => peel(&group.elem),
        Type::Paren(paren) => peel(&paren.elem),
        other => other,
    }
}

/// `T` if `ty` is written `...::Envelope<T>`.
fn envelope_payload(ty: &Type) -> Option<&Type> {
    let Type::Path(path) = peel(ty) else {
        return None;
    };
    if path.qself.is_some() {
        return None;
    }
    let last = path.path.segments.last()?;
    if last.ident != "Envelope" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let mut args = args.args.iter();
    match (args.next(), args.next()) {
        (Some(GenericArgument::Type(payload)), None) => Some(payload),
        _ => None,
    }
}

/// Collects several errors into one.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    /// An error at one span.
    fn push(&mut self, span: Span, message: impl std::fmt::Display) {
        self.add(syn::Error::new(span, message));
    }

    /// An error underlining all of `tokens` (`Span::join` is nightly-only, but rustc joins
    /// the first and last spans of the emitted `compile_error!`).
    fn push_spanned(&mut self, tokens: impl ToTokens, message: impl std::fmt::Display) {
        self.add(syn::Error::new_spanned(tokens, message));
    }

    fn add(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(first) => first.combine(error),
            None => self.0 = Some(error),
        }
    }
}

impl HandlerFn {
    /// Checks the signature's shape; the types themselves are checked by the compiler, through
    /// the assertions the expansion emits.
    pub(crate) fn validate(&self) -> syn::Result<HandlerSig<'_>> {
        validate(&self.sig, Form::Free)
    }
}

/// Checks a handler signature of either form.
fn validate(sig: &Signature, form: Form) -> syn::Result<HandlerSig<'_>> {
    let expected = expected(&sig.ident.to_string(), form);
    let mut errors = Errors::default();

    if let Some(token) = &sig.constness {
        errors.push_spanned(
            token,
            format!("oncely handlers cannot be `const fn`; {expected}"),
        );
    }
    if sig.asyncness.is_none() {
        errors.push(sig.fn_token.span, "oncely handlers must be `async fn`");
    }
    if let Some(token) = &sig.unsafety {
        errors.push_spanned(
            token,
            format!("oncely handlers cannot be `unsafe fn`; {expected}"),
        );
    }
    if let Some(abi) = &sig.abi {
        errors.push_spanned(
            abi,
            format!("oncely handlers cannot be `extern fn`; {expected}"),
        );
    }
    if !sig.generics.params.is_empty() {
        errors.push_spanned(
            &sig.generics,
            format!("oncely handlers cannot be generic; {expected}"),
        );
    }
    if let Some(where_clause) = &sig.generics.where_clause {
        errors.push_spanned(
            where_clause,
            format!("oncely handlers cannot have a `where` clause; {expected}"),
        );
    }
    if let Some(variadic) = &sig.variadic {
        errors.push_spanned(
            variadic,
            format!("oncely handlers cannot be variadic; {expected}"),
        );
    }

    let (conn, msg) = arguments(sig, form, &expected, &mut errors).unzip();

    if let Some(conn) = conn {
        let is_mut_ref = matches!(peel(&conn.ty), Type::Reference(r) if r.mutability.is_some());
        if !is_mut_ref {
            errors.push_spanned(
                &conn.ty,
                format!("the first argument must be `&mut AsyncPgConnection`; {expected}"),
            );
        }
    }
    let message = msg.and_then(|msg| {
        let payload = envelope_payload(&msg.ty);
        if payload.is_none() {
            errors.push_spanned(
                &msg.ty,
                format!(
                    "the second argument must be `Envelope<T>`, T being the message type; \
                         {expected}"
                ),
            );
        }
        payload
    });

    let output = match &sig.output {
        ReturnType::Type(_, ty) => Some(&**ty),
        ReturnType::Default => {
            errors.push(
                sig.paren_token.span.close(),
                format!("missing return type `-> Result<(), HandlerError>`; {expected}"),
            );
            None
        }
    };

    if let Some(error) = errors.0 {
        return Err(error);
    }
    match (conn, msg, message, output) {
        (Some(conn), Some(msg), Some(message), Some(output)) => Ok(HandlerSig {
            conn,
            msg,
            message,
            output,
        }),
        // Every `None` above pushed an error.
        _ => Err(syn::Error::new(sig.ident.span(), expected)),
    }
}

/// `conn` and `msg` when the arguments have the form's shape; what is wrong goes to `errors`.
fn arguments<'a>(
    sig: &'a Signature,
    form: Form,
    expected: &str,
    errors: &mut Errors,
) -> Option<(&'a PatType, &'a PatType)> {
    let mut typed = Vec::new();
    let mut receiver_ok = form == Form::Free;
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(receiver) if form == Form::Free => errors.push_spanned(
                receiver,
                format!(
                    "a free oncely handler cannot take `self`: for a handler with state, \
                         put `#[oncely::handler(...)]` on the `impl` block that holds the \
                         method; {expected}"
                ),
            ),
            FnArg::Receiver(receiver) => {
                // `Handler::handle` lends the handler shared: `&mut self` or `self` would
                // not compile in the generated impl, so say it here.
                let shared = receiver.reference.is_some()
                    && receiver.mutability.is_none()
                    && receiver.colon_token.is_none();
                if !shared {
                    errors.push_spanned(
                        receiver,
                        format!("an oncely handler method takes `&self`; {expected}"),
                    );
                }
                receiver_ok = true;
            }
            FnArg::Typed(arg) => typed.push(arg),
        }
    }
    if !receiver_ok {
        errors.push(
            sig.paren_token.span.join(),
            format!("an oncely handler method takes `&self` first; {expected}"),
        );
    }
    match typed.as_slice() {
        [conn, msg] if receiver_ok => Some((*conn, *msg)),
        _ => {
            if receiver_ok {
                errors.push(
                    sig.paren_token.span.join(),
                    format!(
                        "oncely handlers take exactly 2 arguments{}, found {}; {expected}",
                        if form == Form::Method {
                            " after `&self`"
                        } else {
                            ""
                        },
                        typed.len()
                    ),
                );
            }
            None
        }
    }
}
